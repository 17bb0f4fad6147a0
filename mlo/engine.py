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

Layout (docs/design.md#architecture). The engine is a facade over collaborators
with narrow interfaces, each given what it needs: :class:`mlo.schedule.Schedule`
(who updates), :class:`mlo.update.Updater` (one update: loss, gradient,
hypergradient, guard, step; the hypergradient layer's view), :class:`mlo.windows.Windows`
(windows and reads), :class:`mlo.events.Events` (progress, loggers, validation, early
stopping, callbacks, monitor), and two strategies chosen once: nesting
(:mod:`mlo.nesting`) and data parallelism (:mod:`mlo.parallel`). Every value that
changes during a run lives in :class:`mlo.state.RunState` (``engine.state``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

import engines.base as methods

from .config import EngineConfig
from .events import Events
from .graph import Graph, GraphError
from .interrupt import Interrupted, deferred_signals
from .nesting import nesting_strategy
from .optim import FunctionalOptimizer
from .parallel import data_parallelism
from .problem import Problem
from .schedule import Schedule
from .state import RunState, Window
from .update import Updater
from .windows import Windows

__all__ = ["Engine"]

Deps = Mapping[str, Mapping[Union[str, Problem], Sequence[Union[str, Problem]]]]


class Engine:
    """Runs problems connected by dependencies.

    Args:
        problems: the :class:`Problem` nodes.
        dependencies: ``{"u2l": {upper: [lower, ...]}, "l2u": {lower: [upper, ...]}}``
            with problems or their names (see :mod:`mlo.graph`).
        config: an :class:`EngineConfig` (or a dict of its fields, as for
            :class:`ProblemConfig`).

    Raises:
        GraphError: unknown or duplicate names, a problem not in this engine, a
            cycle, a problem connected to nothing, an unknown method name; under
            data parallelism, a problem with per-window variables (not supported yet).
        ValueError: a config dict with a key that is not an ``EngineConfig`` field.
        TypeError: a config that is neither an ``EngineConfig`` nor a dict.
    """

    def __init__(self, problems: Sequence[Problem], dependencies: Optional[Deps] = None,
                 config: Optional[EngineConfig] = None):
        problems = list(problems)
        self.graph = _graph(problems, dependencies)
        self.problems: Dict[str, Problem] = {p.name: p for p in problems}
        self.config = _engine_config(config)
        on_path = set().union(*(self.graph.path_nodes(n) for n in self.problems))
        _check_methods(self.problems, on_path)
        windowed = _windowed(self.problems, self.graph, on_path)
        _check_solvers(self.problems, on_path)
        #: The run state (mlo.state.RunState): everything that changes during a run.
        self.state = RunState({n: self.graph.lowers(n) for n in self.problems})
        for n, P in self.problems.items():
            P.bind(self.state[n])
        # Device and precision (mlo.precision): modules moved now, batches before each loss.
        device = None if self.config.device is None else torch.device(self.config.device)
        if device is not None:
            for P in problems:
                P.module.to(device)
        # Data parallel over torch.distributed (mlo.distributed): same start on every rank.
        self.parallel = data_parallelism(getattr(self.config, "distributed", "auto"))
        self.nesting = nesting_strategy(self.config.nesting, self.graph, self.problems, windowed,
                                        self._plain, bool(self.config.monitor), self.parallel.enabled)
        if self.parallel.enabled:
            self.parallel.start(problems)
            if not self.parallel.is_main():   # rank 0 alone prints, logs and shows progress
                self.config = dataclasses.replace(self.config, progress=False, loggers=[], log_every=None)
        self.windows = Windows(self.problems, self.graph, self.state, windowed, self.nesting)
        # The last gradient applied, for problems whose method needs the optimizer (SAMA).
        keep_grad = {n for n in on_path if "optimizer" in methods.info(self.problems[n].config.method).needs}
        self.updater = Updater(self.problems, self.graph, self.config, self.state, self.windows,
                               self.nesting, self.parallel, windowed, keep_grad, device)
        self.schedule = Schedule(self.problems, self.graph, self.state, self.nesting)
        self.events = Events(self, self.problems, self.graph, self.config, self.state,
                             self.gradient, self.parallel.is_main())

    def _plain(self, name: str) -> bool:
        """Whether problem ``name``'s VJP is plain reverse mode through its window (a
        WindowProblem's steps always are: its options do not change them)."""
        cfg = self.problems[name].config
        return methods.info(cfg.method).is_plain_backward(cfg.method_options)

    # ------------------------------------------------------------- schedule
    def run(self, iterations: int, callbacks: Sequence[Any] = ()) -> List[Dict[str, Any]]:
        """Runs ``iterations`` iterations; returns the validation history.

        Args:
            iterations: how many.
            callbacks: objects with any of ``after_update(engine, problem)``,
                ``after_iteration(engine)``, ``after_validation(engine, metrics)``
                (:mod:`mlo.callbacks`). Early stopping or ``request_stop()`` ends the
                run after the current iteration — under data parallelism on every rank
                when one rank asks (a deferred signal, too: every rank raises).

        Raises:
            mlo.interrupt.Interrupted: Ctrl-C or SIGTERM arrived (``EngineConfig(
                defer_signals=True)``, the default): the run stops at the end of the
                iteration — or, when an unrolled window is open then, at the end of the
                iteration that consumes it (within ``iterations``), so that a
                checkpoint saved now resumes bit for bit. A second signal stops at once.
        """
        if not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
        self.events.start_run(callbacks, iterations)
        try:
            with deferred_signals(self.config.defer_signals) as signals:
                pending = None
                events, parallel = self.events, self.parallel
                for _ in range(iterations):
                    self.step()
                    if events.shows_progress:
                        events.after_iteration_of_run()
                    if parallel.enabled:
                        # Agreed by every rank (one all-reduce), so all leave at the same iteration.
                        stop, pending = parallel.agree_stop(self.state.stop_requested, signals.signum)
                    else:     # (one process: its own; SingleProcess.agree_stop, without the call)
                        stop, pending = self.state.stop_requested, signals.signum
                    if pending is not None and not self.state.open_windows():
                        raise Interrupted(pending, self.state.iteration)
                    if stop:
                        self.state.stop_requested = True
                        break
            if pending is None:
                pending = signals.signum
            if pending is not None:     # (the iterations ran out first)
                raise Interrupted(pending, self.state.iteration)
        finally:
            self.events.end_run()
        return self.history

    def step(self) -> None:
        """One iteration: lower problems step, ready upper problems update.

        An exception that ends an iteration early (a data iterator, a loss, a
        callback, a second Ctrl-C) leaves the engine resumable: the updates already
        applied in it stay applied, the failing one changed nothing a retry would see
        (:meth:`mlo.update.Updater.update`), the schedule's counters are back at the
        iteration's start and ``state.resume`` counts the applied updates — so the next
        ``step`` (or a checkpoint saved now and loaded later) finishes the same
        iteration without repeating them, exactly as an uninterrupted run."""
        schedule, events, update = self.schedule, self.events, self.updater.update
        applied = 0
        try:
            for P in schedule.due(self.state.resume):
                ref = events.monitor_reference(P) if events.monitored else None
                result = update(P)
                applied += 1
                if result.applied:
                    events.after_update(P, result.extras, ref)
        except BaseException:
            schedule.interrupt(applied)
            raise
        for n in schedule.consumed:
            self.windows.close(n)
        self.state.resume = 0
        self.state.iteration += 1
        if events.busy or events.callbacks:       # (nothing to do otherwise)
            events.end_of_iteration()

    # ------------------------------------------------------------- gradients
    def gradient(self, name: str, batch: Any = None, by_path: bool = False,
                 method: Optional[tuple] = None) -> Dict[str, Any]:
        """``P``'s gradient at the current state, without updating anything.

        Args:
            name: the problem.
            batch: the batch to evaluate (default: the problem's next batch).
            by_path: also return each hypergradient path's contribution.
            method: ``(method name, options)`` to use on every problem of ``name``'s
                paths instead of their configured methods (e.g. a CG reference); open
                windows are then evaluated at their current iterate. It must not be a
                window method (those need the steps taken with them).

        Returns:
            ``{"loss": float, "grad": {param: tensor}, "own": {param: ∂F/∂λ},
            "paths": {path: {param: tensor}}}`` (``own``/``paths`` when it has paths;
            every path lists every variable — zeros where it contributes nothing, e.g.
            when it runs through an unrolled window that has closed). This is a report:
            every entry is a tensor, zeros for a variable with no gradient at all —
            which an update leaves to ``torch.optim`` as ``None`` (the optimizer then
            skips it: no weight decay, no momentum step).

            The paths sum to the total exactly for methods whose VJP is linear in the
            vector (unrolled, Neumann, CG run to convergence) and only approximately
            for finite differences and truncated CG (docs/methods.md#per-path-breakdown
            gives the measured gap).

        Module buffers (e.g. BatchNorm running statistics) and the RNG state are
        restored afterwards; only ``P.last_batch`` and, without ``batch``, the data
        iterator advance.
        """
        return self.updater.report(name, batch, by_path, method)

    def loss(self, P: Problem, batch) -> Tensor:
        """``P.training_step(batch)`` as the engine evaluates it (device, precision, the
        scalar loss of a dict); call it inside a read context (as the engine does)."""
        return self.updater.loss(P, batch)

    def inner_lr(self, name: str) -> Union[float, tuple]:
        """Problem ``name``'s learning rate: one float, or one per variable when its
        optimizer's param groups have different learning rates."""
        return self.updater.inner_lr(name)

    def optimizer_view(self, name: str) -> List[Mapping[str, Any]]:
        """Problem ``name``'s optimizer as its last update left it (see
        :meth:`mlo.update.Updater.optimizer_view`)."""
        return self.updater.optimizer_view(name)

    # ------------------------------------------------------------- windows
    def window(self, name: str) -> Optional[Window]:
        """Problem ``name``'s open window (its differentiable steps), or ``None``."""
        return self.windows.get(name)

    def windowed(self, name: str) -> bool:
        """Whether problem ``name`` steps through windows (its method's declaration)."""
        return self.updater.windowed(name)

    def open_windows(self) -> Dict[str, int]:
        """``{problem: steps taken}`` of every open window."""
        return self.state.open_windows()

    def close_windows(self) -> None:
        """Writes all unrolled iterates back into the modules (e.g. before saving)."""
        self.windows.close_all()

    # ------------------------------------------------------------- events
    def request_stop(self) -> None:
        """Ends the current ``run`` after this iteration (for callbacks)."""
        self.state.stop_requested = True

    def restore_best(self) -> None:
        """Loads the state (modules, optimizers, schedulers of every problem) saved at the
        best validation of ``EngineConfig(early_stopping=...)``; open windows are closed
        first. Counters (iteration, step counts) are not rewound."""
        self.events.restore_best()

    # ------------------------------------------------------------- the run state
    @property
    def iteration(self) -> int:
        """Iterations completed (``state.iteration``)."""
        return self.state.iteration

    @property
    def records(self) -> Dict[str, Dict[str, Any]]:
        """Per problem: updates, seconds spent in them (own gradient + hypergradient +
        optimizer step), and the last update's loss and gradient norms
        (``state.records``)."""
        return self.state.records

    @property
    def last_hypergradient(self) -> Dict[str, Dict[str, Tensor]]:
        """Per problem with paths: the hypergradient applied at its last update
        (``state.last_hypergradient``)."""
        return self.state.last_hypergradient

    @property
    def last_extras(self) -> Dict[str, Dict[str, float]]:
        """Per problem: the scalar extras of its last update's ``training_step`` dict
        (``state.last_extras``)."""
        return self.state.last_extras

    @property
    def history(self) -> List[Dict[str, Any]]:
        """The validation results (``state.history``)."""
        return self.state.history

    @property
    def stop_requested(self) -> bool:
        """Whether the current ``run`` ends after this iteration (``state.stop_requested``)."""
        return self.state.stop_requested

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        self.state.stop_requested = bool(value)

    @property
    def early_stopping(self):
        """The early-stopping tracker (``best``, ``best_iteration``), or ``None``."""
        return self.events.early_stopping

    @property
    def periodic_checkpoints(self):
        """``EngineConfig(checkpoint_every=...)``'s writer, or ``None``."""
        return self.events.periodic_checkpoints

    @property
    def data_parallel(self) -> bool:
        """Whether the engine averages over ``torch.distributed`` ranks."""
        return self.parallel.enabled

    def counts(self) -> Dict[str, int]:
        """Updates taken per problem."""
        return {n: p.step_count for n, p in self.problems.items()}


# ----------------------------------------------------------------- construction checks
def _engine_config(config: Any) -> EngineConfig:
    """``config`` as an :class:`EngineConfig`: as given, built from a dict of its fields,
    or the default for ``None``."""
    if config is None:
        return EngineConfig()
    if isinstance(config, EngineConfig):
        return config
    if isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = [k for k in config if k not in known]
        if unknown:
            raise ValueError(f"Engine(config=...): unknown EngineConfig field(s) "
                             f"{', '.join(map(repr, unknown))}; known: {sorted(known)}")
        return EngineConfig(**config)
    raise TypeError(f"Engine(config=...) must be an EngineConfig or a dict of its fields, got "
                    f"{type(config).__name__}")


def _graph(problems: List[Problem], dependencies: Optional[Deps]) -> Graph:
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
    return Graph([p.name for p in problems], _names(dependencies.get("u2l", {}), ids, "u2l"),
                 _names(dependencies.get("l2u", {}), ids, "l2u"))


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


def _check_methods(problems: Mapping[str, Problem], on_path) -> None:
    for n in on_path:
        cfg = problems[n].config
        try:
            methods.check_options(cfg.method, cfg.method_options)
        except KeyError as e:
            raise GraphError(f"problem {n!r}: {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise type(e)(f"problem {n!r}: ProblemConfig.method_options: {e}") from None


def _windowed(problems: Mapping[str, Problem], graph: Graph, on_path) -> set:
    """The problems that step through windows: by their method's contract (methods that
    differentiate through the lower's steps), and every per-window problem."""
    windowed = {n for n in on_path if methods.info(problems[n].config.method).window}
    for n, P in problems.items():
        if P.per_window:
            _check_per_window(P, graph)
            windowed.add(n)
    for n in sorted(windowed):
        opt = problems[n].optimizer
        if not FunctionalOptimizer.supports(opt):
            raise GraphError(
                f"problem {n!r}: method {problems[n].config.method!r} steps with a "
                f"differentiable twin of its optimizer, which exists for torch.optim "
                f"{FunctionalOptimizer.supported()} (exactly those classes, not subclasses); got "
                f"{type(opt).__name__}. Use one of those, or an implicit / "
                f"finite-difference method (config.method='cg', 'neumann' or 'finite_difference')")
    return windowed


def _check_solvers(problems: Mapping[str, Problem], on_path) -> None:
    """A problem with its own solver (``Problem.solve``) takes no steps: its method must
    work at the current iterate, and a scheduler would have nothing to schedule."""
    for n, P in problems.items():
        if type(P).solve is Problem.solve:
            continue
        info = methods.info(P.config.method)
        if n in on_path and (info.window or "optimizer" in info.needs):
            raise GraphError(
                f"problem {n!r} defines solve(batch): its updates take no optimizer steps, so "
                f"method {P.config.method!r} has no steps to differentiate through; use an "
                f"implicit or finite-difference method (config.method='cg', 'neumann', "
                f"'finite_difference' or 'darts')")
        if P.per_window:
            raise GraphError(f"problem {n!r} defines solve(batch) but has per-window variables "
                             f"(WindowProblem); use a Problem")
        if P.scheduler is not None:
            raise GraphError(f"problem {n!r} defines solve(batch): its optimizer is not stepped, "
                             f"so its scheduler has nothing to schedule; remove it")


def _check_per_window(P: Problem, graph: Graph) -> None:
    n, cfg = P.name, P.config
    if not methods.info(cfg.method).window:
        raise GraphError(f"problem {n!r} has per-window variables (WindowProblem): its method must "
                         f"step through a window (e.g. config.method='unrolled'), got "
                         f"{cfg.method!r} — an implicit method has no iterate that outlives the window")
    if not graph.above[n]:
        raise GraphError(f"problem {n!r} has per-window variables but no problem above it to "
                         f"consume its windows; declare its upper in u2l/l2u")
    if P.scheduler is not None:
        raise GraphError(f"problem {n!r} has per-window variables: a scheduler has nothing to "
                         f"schedule (every window starts a fresh optimizer); remove it")
    if P.config.update_every != 1 or P.config.update_every_iterations is not None:
        raise GraphError(f"problem {n!r} has per-window variables: update_every / "
                         f"update_every_iterations would leave a window without steps; use the "
                         f"upper's schedule instead")
