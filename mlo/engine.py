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
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

import engines.base as eb

from . import callbacks as cb
from . import monitor as mon
from . import distributed as _dist
from . import precision as _precision
from .config import EngineConfig
from . import lint as _lint
from .graph import Graph, GraphError
from .optim import FunctionalOptimizer
from .hypergrad import hypergradient, naming_second_order_errors, path_contribution, second_order_kernels
from .isolation import no_side_effects, rng_state
from .problem import Problem
from .state import Read, ReadContext, RunState, Window, reading

__all__ = ["Engine"]


def _plain(v):
    """A hyperparameter for ``torch.optim``: tensors become floats, also inside tuples (betas)."""
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(x) for x in v)
    return float(v.detach()) if isinstance(v, Tensor) else v

Deps = Mapping[str, Mapping[Union[str, Problem], Sequence[Union[str, Problem]]]]


class Engine:
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
                    f"differentiable twin of its optimizer, which exists for torch.optim.SGD, Adam "
                    f"and AdamW; got {type(opt).__name__}. Use one of those, or an implicit / "
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

    # --------------------------------------------------------------- events
    def _init_events(self) -> None:
        """Hooks, loggers, validation, early stopping and monitor state (mlo.callbacks)."""
        c = self.config
        self._callbacks: List[Any] = []
        self._progress: Optional[cb.Progress] = None
        self._updating: Optional[Problem] = None
        self._norm_hint: Optional[dict] = None   # _gradient -> _norms of the same update
        self._linted: set = set()   # problems whose reads mlo.lint has checked (it checks once)
        self._extras: Optional[dict] = None
        self._logged: Dict[str, int] = {}
        #: Per problem: the scalar extras of its last update's ``training_step`` dict
        #: (every key but ``"loss"``, e.g. ``{"acc": 0.93}``), as floats.
        self.last_extras: Dict[str, Dict[str, float]] = {}
        self.stop_requested = False
        es = c.early_stopping
        #: The early-stopping tracker (``best``, ``best_iteration``), or ``None``.
        self.early_stopping = cb.EarlyStopping(**es) if es else None
        self._monitored: set = set()
        if c.monitor:
            method, opts = c.monitor["reference"]
            if method in eb.available() and eb.info(method).window:
                raise ValueError("EngineConfig.monitor: the reference must be an implicit or "
                                 "finite-difference method (e.g. ('cg', {'max_iter': 50, 'tol': 1e-10}))")
            try:
                eb.check_options(method, opts)
            except KeyError as e:
                raise ValueError(f"EngineConfig.monitor['reference']: {e.args[0]}") from None
            except (TypeError, ValueError) as e:
                raise type(e)(f"EngineConfig.monitor['reference']: {e}") from None
            with_paths = [n for n in self.problems if self.graph.paths(n)]
            names = c.monitor.get("problems") or with_paths
            bad = [n for n in names if n not in with_paths]
            if bad:
                raise ValueError(f"EngineConfig.monitor['problems']: {bad} have no hypergradient "
                                 f"paths; problems with paths: {with_paths}")
            self._monitored = set(names)

    def request_stop(self) -> None:
        """Ends the current ``run`` after this iteration (for callbacks)."""
        self.stop_requested = True

    def restore_best(self) -> None:
        """Loads the state (modules, optimizers, schedulers of every problem) saved at the
        best validation of ``EngineConfig(early_stopping=...)``; open windows are closed
        first. Counters (iteration, step counts) are not rewound."""
        if self.early_stopping is None or self.early_stopping.state is None:
            raise RuntimeError("restore_best: no best state kept — set EngineConfig(early_stopping="
                               "{'metric': ..., 'mode': ..., 'patience': ...}) and run a validation first")
        cb.restore(self, self.early_stopping.state)

    def _write(self, msg: str) -> None:
        if self._dist and not _dist.is_main():
            return
        if self._progress is not None:
            self._progress.write(msg)
        else:
            print(msg, flush=True)

    def _log(self, metrics: Dict[str, float], iteration: Optional[int] = None) -> None:
        for lg in self.config.loggers:
            lg.log(self.iteration if iteration is None else iteration, metrics)

    def _after_update(self, P: Problem, ref) -> None:
        rec = self.records[P.name]
        if self._extras is not None:
            self.last_extras[P.name] = cb.scalars({k: v for k, v in self._extras.items() if k != "loss"})
            self._extras = None
        P.after_step()
        if ref and P.name in self.last_hypergradient:
            cos, rel = mon.compare(self.last_hypergradient[P.name], ref, P.param_names)
            rec["monitor_cosine"], rec["monitor_rel_error"] = cos, rel
            method, opts = self.config.monitor["reference"]
            it = self.iteration + 1     # the iteration in progress (1-based, as the other logs)
            self._write(f"[mlo] iter {it} monitor {P.name}: cosine {cos:.6f}, relative "
                        f"error {rel:.3g} ({P.name}'s paths by {self._path_methods(P.name)} vs "
                        f"{method} {opts})")
            self._log({f"{P.name}/monitor_cosine": cos, f"{P.name}/monitor_rel_error": rel}, it)
        cb.emit(self._callbacks, "after_update", self, P)

    def _path_methods(self, name: str) -> str:
        return ", ".join(f"{n}={self.problems[n].config.method}" for n in sorted(self.graph.path_nodes(name)))

    def _monitor_reference(self, P: Problem):
        """The reference hypergradient at the state this update will use (or ``None``)."""
        if P.name not in self._monitored or (P.step_count + 1) % self.config.monitor["every"]:
            return None
        method, opts = self.config.monitor["reference"]
        return mon.reference_hypergradient(self, P.name, method, opts, batch=P.peek_batch())

    def _end_of_iteration(self) -> None:
        c = self.config
        printing = c.log_every is not None and self.iteration % c.log_every == 0
        if printing or (c.loggers and c.log_every is None):
            self._log_training(printing)
        if c.validate_every and c.validation and self.iteration % c.validate_every == 0:
            self._validate()
        cb.emit(self._callbacks, "after_iteration", self)

    def _log_training(self, printing: bool) -> None:
        if printing:
            self._write(f"[mlo] iter {self.iteration}: " + ", ".join(
                f"{n}={p.last_loss.item():.4g}" + "".join(
                    f", {n}.{k}={v:.4g}" for k, v in self.last_extras.get(n, {}).items())
                for n, p in self.problems.items() if p.last_loss is not None))
        if self.config.loggers:
            metrics: Dict[str, float] = {}
            for n, rec in self.records.items():
                if "loss" in rec and rec["updates"] != self._logged.get(n):
                    self._logged[n] = rec["updates"]
                    metrics[f"{n}/loss"] = rec["loss"]
                    metrics.update({f"{n}/{k}": v for k, v in self.last_extras.get(n, {}).items()})
            if metrics:
                self._log(metrics)

    def _validate(self) -> None:
        """Runs ``config.validation`` with every module in eval mode (modes restored)."""
        c = self.config
        with cb.eval_mode(P.module for P in self.problems.values()):
            out = c.validation(self)
        try:
            metrics = dict(out)
        except (TypeError, ValueError):
            raise TypeError(f"EngineConfig.validation must return a dict of metrics, got "
                            f"{type(out).__name__} ({out!r}) at iteration {self.iteration}") from None
        self.history.append({"iteration": self.iteration, **metrics})
        nums = cb.scalars(metrics)
        self._write(f"[mlo] iter {self.iteration} validation: " + ", ".join(
            f"{k}={v:.4g}" for k, v in nums.items()))
        if nums:
            self._log({f"val/{k}": v for k, v in nums.items()})
        es = self.early_stopping
        if es is not None and es.update(self, metrics):
            self.stop_requested = True
            self._write(f"[mlo] early stopping at iteration {self.iteration}: {es.metric} has not "
                        f"improved for {es.patience} validations (best {es.best:.4g} at iteration "
                        f"{es.best_iteration}; engine.restore_best() loads that state)")
        cb.emit(self._callbacks, "after_validation", self, metrics)

    # --------------------------------------------------------------- update
    def loss(self, P: Problem, batch) -> Tensor:
        """``P.training_step(batch)`` as the engine evaluates it (device, precision, the
        scalar loss of a dict); call it inside a read context (as the engine does)."""
        if self.config.precision == "fp32" and self._device is None:   # (no autocast, no moves)
            out = P.training_step(batch)
        else:
            with _precision.autocast(self.config.precision, self._device):
                out = P.training_step(_precision.to_device(batch, self._device))
        if isinstance(out, dict) and self._updating is P:
            self._extras = out          # dict extras of an update (engine.last_extras)
        loss = out.get("loss") if isinstance(out, dict) else out
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"problem {P.name!r}: training_step must return a scalar tensor or a "
                            f"dict with a scalar 'loss', got {type(out).__name__}")
        if loss.dtype in (torch.bfloat16, torch.float16):
            loss = loss.float()
        return loss if loss.dim() == 0 else loss.reshape(())

    def inner_lr(self, name: str) -> Union[float, tuple]:
        """Problem ``name``'s learning rate: one float, or one per variable when its
        optimizer's param groups have different learning rates."""
        P = self.problems[name]
        lr = {id(p): float(g.get("lr", 1.0)) for g in P.optimizer.param_groups for p in g["params"]}
        per = tuple(lr[id(p)] for p in P.variables)
        return per[0] if len(set(per)) == 1 else per

    def _gradient(self, P: Problem, batch, diff: bool, by_path: bool = False, override=None,
                  keep_graph: bool = False):
        """Loss, total gradient (own + hypergradient) and the reads of ``P``'s loss."""
        name = P.name
        nodes = self.graph.path_nodes(name)
        reads: List[Read] = []
        self._norm_hint = None
        self.state[name].last_batch = batch
        # The top reads the nest's live iterates (exact nesting, or the fused two-level case).
        live = (self._exact or (self._fused and not by_path and override is None)) \
            and name == self._unique_top
        resolve, own_view = (lambda S: self._alias(P, S, diff, nodes, reads, live)), None
        grad_wrt = None
        if self._exact and diff and not self.graph.lowers(name):
            # Exact nesting, a bottom level: its step is the partial derivative at fixed
            # uppers — whose live iterates may depend on this problem's earlier iterates
            # (a middle level stepped on them). A fresh view of the iterate carries the
            # gradient, so no path through the uppers' live iterates reaches it.
            own_view = grad_wrt = {k: t.view_as(t) for k, t in P.own_state().items()}
        if self._dist and diff:
            # Data parallel inside a window: the loss reads every variable through
            # grad_average, so its gradient and every derivative of that gradient
            # (backward through the window) are those of the global batch.
            resolve, own_view = _dist.reading_views(resolve, P.own_state(), P.param_names)
        # Inside a window the loss's gradient is differentiated again later.
        with second_order_kernels(diff), reading(ReadContext(P, resolve, own=own_view)):
            loss = self.loss(P, batch)
        if name not in self._linted:     # once per problem: declared reads without gradient
            try:
                _lint.check_reads(self, P, loss, reads)
            finally:
                self._linted.add(name)
        if live or (self._exact and name == self._unique_top):
            if by_path or override is not None:
                raise ValueError("EngineConfig(nesting='exact') gives the total hypergradient only: "
                                 "by_path and method overrides need nesting='betty'")
            return self._exact_top_gradient(P, loss, keep_graph)
        st = grad_wrt if grad_wrt is not None else P.own_state()   # (not the data-parallel views)
        own = [st[k] for k in P.param_names]
        tracked = [(r, k, a) for r in reads if r.source in nodes and not r.live for k, a in r.alias.items()]
        if not loss.requires_grad:
            raise RuntimeError(f"problem {name!r}: its loss does not depend on its own variables "
                               f"{P.param_names} (it has no autograd graph); call the module "
                               f"through the problem (self(x)) or read self.params")
        if diff:
            # The update's graph uses the forward graph's saved tensors: keep it
            # (first-order per-window steps take the gradient as a constant).
            g = torch.autograd.grad(loss, own, create_graph=not getattr(P, "first_order", False),
                                    allow_unused=True, retain_graph=bool(tracked) or None)
            ga = (torch.autograd.grad(loss, [a for *_, a in tracked], allow_unused=True,
                                      retain_graph=True) if tracked else ())
        else:
            allg = torch.autograd.grad(loss, own + [a for *_, a in tracked], allow_unused=True)
            if self._dist:   # data parallel: the mean over ranks is the global batch's gradient
                allg = _dist.average_optional(allg, own + [a for *_, a in tracked])
            g, ga = allg[:len(own)], allg[len(own):]
        if self._dist:
            loss = _dist.average([loss.detach()])[0]
        if all(x is None for x in g) and not tracked:
            raise RuntimeError(f"problem {name!r}: its loss does not depend on its own variables "
                               f"{P.param_names}; call the module through the problem (self(x)) "
                               f"or read self.params")
        grads = [x if x is not None else torch.zeros_like(t) for x, t in zip(g, own)]
        extra: Dict[str, Any] = {}
        if tracked:
            direct: Dict[int, Any] = {}
            for (r, k, a), x in zip(tracked, ga):
                if x is not None:
                    direct.setdefault(id(r), (r.source, (r.src_state, {})))[1][1][k] = x
            direct_list = list(direct.values())
            if by_path:
                # Every variable in every path's entry: a path truncated at a closed
                # window (or not reaching some variable) contributes zeros, not nothing.
                extra["paths"] = {}
                for p in self.graph.paths(name):
                    c = path_contribution(self, p, direct_list, override)
                    extra["paths"][p] = {k: c[k] if k in c else torch.zeros_like(t)
                                         for k, t in zip(P.param_names, own)}
            h = hypergradient(self, name, direct_list, override)
            own_d, hyper_d, total, hint = {}, {}, [], {}
            for k, gi, t, x in zip(P.param_names, grads, own, g):
                od = own_d[k] = gi.detach()
                if x is None:
                    hint[id(od)] = None            # zeros_like: its norm is 0
                if k in h:
                    hd = hyper_d[k] = h[k].detach()
                    tot = gi + h[k].to(gi.dtype)
                    if x is None and h[k].dtype == gi.dtype:
                        hint[id(tot)] = hd         # 0 + h: h's values, h's norm
                else:
                    z = hyper_d[k] = torch.zeros_like(t)
                    hint[id(z)] = None
                    tot = gi
                    hint[id(tot)] = None if x is None else od
                total.append(tot)
            extra["own"], extra["hyper"] = own_d, hyper_d
            grads = total
            self._norm_hint = hint
        return loss, grads, reads, extra

    def _exact_top_gradient(self, P: Problem, loss: Tensor, keep_graph: bool):
        """``EngineConfig(nesting="exact")``, the top's update: its loss reads the nest's
        live iterates, so one backward reaches every read of the top's variables made
        inside the nest's open windows (aliases, new graphs) — the total derivative."""
        if not loss.requires_grad:
            raise RuntimeError(f"problem {P.name!r}: its loss has no autograd graph (it depends "
                               f"neither on its own variables {P.param_names} nor on its lowers)")
        own = list(P.own_state().values())
        seen, leaves = set(), []
        nest = self.graph.path_nodes(P.name)
        for n in nest:
            win = self.state[n].window
            for r in (win.reads if win is not None else ()):
                if r.source == P.name and not r.live:
                    for k, a in r.alias.items():
                        if a.requires_grad and id(a) not in seen:
                            seen.add(id(a))
                            leaves.append((k, a))
        names = sorted(nest)
        with naming_second_order_errors(names, [self.problems[n].config.method for n in names]):
            allg = torch.autograd.grad(loss, own + [a for _, a in leaves], allow_unused=True,
                                       retain_graph=keep_graph or None)
        grads = [x if x is not None else torch.zeros_like(t) for x, t in zip(allg, own)]
        acc: Dict[str, Tensor] = {}
        for (k, _), x in zip(leaves, allg[len(own):]):
            if x is not None:
                acc[k] = acc[k] + x if k in acc else x
        hyper = {k: (acc[k].to(t.dtype) if k in acc else torch.zeros_like(t))
                 for k, t in zip(P.param_names, own)}
        own_d, total, hint = {}, [], {}
        for k, gi, x in zip(P.param_names, grads, allg):
            od = own_d[k] = gi.detach()
            if x is None:
                hint[id(od)] = None                # zeros_like: its norm is 0
            if k in acc:
                tot = gi + hyper[k]
                if x is None:
                    hint[id(tot)] = hyper[k]       # 0 + h: h's values, h's norm
            else:
                hint[id(hyper[k])] = None
                tot = gi
                hint[id(tot)] = None if x is None else od
            total.append(tot)
        self._norm_hint = hint
        return loss, total, [], {"own": own_d, "hyper": hyper}

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
            when it runs through an unrolled window that has closed).

        Module buffers (e.g. BatchNorm running statistics) and the RNG state are
        restored afterwards; only ``P.last_batch`` and, without ``batch``, the data
        iterator advance.
        """
        if name not in self.problems:
            raise KeyError(f"no problem named {name!r} (known: {list(self.problems)})")
        P = self.problems[name]
        if P.per_window and self.state[name].window is None:
            raise RuntimeError(f"problem {name!r} has per-window variables and no window is open "
                               f"(they exist from its first update until the problems above consume them)")
        if batch is None:
            batch = P.batch if P.per_window else P.next_batch()
        if method is not None:
            if eb.info(method[0]).window:
                raise ValueError(f"gradient(method={method[0]!r}): a window method needs the "
                                 f"lower steps taken with it; give an implicit or finite-difference "
                                 f"method (e.g. ('cg', {{'max_iter': 50}}))")
            eb.check_options(method[0], method[1])
        with no_side_effects(self.problems.values(), rng_state()):
            loss, grads, _, extra = self._gradient(P, batch, diff=False, by_path=by_path,
                                                   override=method, keep_graph=self._exact or self._fused)
        self._norm_hint = None
        out = {"loss": float(loss.detach()),
               "grad": {k: g.detach() for k, g in zip(P.param_names, grads)}}
        out.update(extra)
        return out

    def _update(self, P: Problem) -> None:
        ref = self._monitor_reference(P) if P.name in self._monitored else None
        t0 = time.perf_counter()
        self._updating, self._extras = P, None
        try:
            applied = self._update_inner(P)
        finally:
            self._updating = None
        rec = self.records[P.name]
        if applied:
            rec["updates"] += 1
        else:
            rec["skipped"] = rec.get("skipped", 0) + 1
        rec["seconds"] += time.perf_counter() - t0
        if applied:
            self._after_update(P, ref)

    @staticmethod
    def _norms(loss: Tensor, grads: List[Tensor], extra: Dict[str, Any],
               hint: Optional[Dict[int, Optional[Tensor]]] = None) -> List[float]:
        """``[loss, ‖grad‖, ‖own‖, ‖hyper‖]`` (the last two when it has paths) as floats,
        with one host synchronisation: every tensor's norm in its own dtype (a float64
        norm of a float32 tensor costs ~25× more: a hot path), stacked once and brought
        to the host, where each group's norm is combined in double precision.

        ``hint`` (from the gradient computation): ``{id(tensor): None}`` for tensors
        known to be zeros (norm 0) and ``{id(tensor): other}`` for tensors with the
        values of ``other`` (``0 + h``): one norm less each, the same numbers. A tensor
        listed twice is normed once."""
        groups = [grads]
        if "hyper" in extra:
            groups += [list(extra["own"].values()), list(extra["hyper"].values())]
        norm = torch.linalg.vector_norm
        ns = [loss.detach()]
        at: Dict[int, int] = {}
        idx: List[int] = []          # per tensor of the groups: its norm's index in ns (-1: zero)
        for g in groups:
            for t in g:
                if hint is not None and id(t) in hint:
                    t = hint[id(t)]
                    if t is None:
                        idx.append(-1)
                        continue
                j = at.get(id(t))
                if j is None:
                    j = at[id(t)] = len(ns)
                    ns.append(norm(t.detach() if t.requires_grad else t))
                idx.append(j)
        if all(n.device.type == "cpu" for n in ns):
            # On the CPU there is no synchronisation to save: each value read directly
            # (the same floats as the stacked, double-converted tensor's).
            flat = [n.item() for n in ns]
        else:
            dt, dev = ns[0].dtype, ns[0].device
            for n in ns:
                if n.dtype != dt or n.device != dev:
                    ns = [n.double().to(dev) for n in ns]
                    break
            flat = torch.stack(ns).tolist()
        vals = [flat[j] if j >= 0 else 0.0 for j in idx]
        out, i = [flat[0]], 0
        isfinite = math.isfinite
        for g in groups:
            part = vals[i:i + len(g)]
            i += len(g)
            out.append(math.sqrt(math.fsum([x * x for x in part])) if all(map(isfinite, part))
                       else math.inf if not any(map(math.isnan, part)) else math.nan)
        return out

    def _nonfinite(self, P: Problem, vals: List[float], grads: List[Tensor], extra: Dict[str, Any]) -> str:
        """What went non-finite in an update (``""`` when nothing did)."""
        if all(math.isfinite(v) for v in vals):
            return ""

        def where(ts):
            bad = [k for k, t in zip(P.param_names, ts) if not bool(torch.isfinite(t.detach()).all())]
            return f" (in {', '.join(map(repr, bad))})" if bad else " (its norm overflowed)"

        what = []
        if not math.isfinite(vals[0]):
            what.append(f"loss ({vals[0]})")
        if "hyper" in extra:
            if not math.isfinite(vals[2]):
                what.append("own gradient" + where(list(extra["own"].values())))
            if not math.isfinite(vals[3]):
                what.append("hypergradient" + where(list(extra["hyper"].values())))
            if len(what) == (0 if math.isfinite(vals[0]) else 1) and not math.isfinite(vals[1]):
                what.append("total gradient (own + hypergradient)" + where(grads))
        elif not math.isfinite(vals[1]):
            what.append("own gradient" + where(grads))
        return (f"problem {P.name!r}: non-finite {' and '.join(what)} at iteration {self.iteration} "
                f"(its update {P.step_count + 1})")

    def _record(self, P: Problem, vals: List[float], extra: Dict[str, Any]) -> None:
        rec = self.records[P.name]
        rec["loss"], rec["grad_norm"] = vals[0], vals[1]
        if "hyper" in extra:
            self.last_hypergradient[P.name] = extra["hyper"]
            rec["own_grad_norm"], rec["hypergrad_norm"] = vals[2], vals[3]

    def _update_inner(self, P: Problem) -> bool:
        """One update of ``P``; ``False`` when it was skipped (non-finite values)."""
        name = P.name
        diff = name in self._windowed
        run = self.state.problems[name]
        opened = diff and run.window is None
        try:
            if opened:
                self._open_window(P)
            batch = P.batch if P.per_window else P.next_batch()
            loss, grads, reads, extra = self._gradient(P, batch, diff)
            hint, self._norm_hint = self._norm_hint, None
            vals = self._norms(loss, grads, extra, hint)
            bad = "" if all(map(math.isfinite, vals)) else self._nonfinite(P, vals, grads, extra)
            if bad and self.config.nonfinite == "raise":
                raise FloatingPointError(
                    f"{bad}; its parameters and optimizer state are unchanged. "
                    f"EngineConfig(nonfinite='skip') skips such updates with a warning instead")
        except BaseException:
            if opened:          # nothing stepped in it: as if it had never been opened
                self._discard_window(P)
            raise
        if bad:
            if opened:
                self._discard_window(P)
            warnings.warn(f"{bad}: update skipped; its parameters and optimizer state are "
                          f"unchanged", RuntimeWarning, stacklevel=4)
            return False
        self._record(P, vals, extra)
        if P.config.grad_clip is not None:
            grads = self._clip(P, grads)
        if type(P).optimizer_hyperparameters is not Problem.optimizer_hyperparameters:
            self._set_hyperparameters(P, diff, reads)
        run.last_loss = loss.detach()
        st = P.own_state()
        own = [st[k] for k in P.param_names]
        if diff:
            win = run.window
            if P.scheduler is not None:
                # Schedulers change torch's param groups; the twin reads its own copy.
                for tg, fg in zip(P.optimizer.param_groups, win.fopt.param_groups):
                    for k in fg:
                        if k not in self._learned_hp.get(name, ()) and k in tg:
                            fg[k] = tg[k]
            new = win.fopt.step(own, grads)
            run.iterates = dict(zip(P.param_names, new))
            win.add_reads(reads)
            win.steps += 1
        else:
            if name in self._keep_grad:
                self._last_grad[name] = [gi.detach() for gi in grads]
            variables = P.variables
            for p, gi in zip(variables, grads):
                p.grad = gi.detach()
            P.optimizer.step()
            for p in variables:
                p.grad = None
        if P.scheduler is not None:
            if diff:    # the twin stepped for torch.optim: torch's order check would misfire
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                    P.scheduler.step()
            else:
                P.scheduler.step()
        run.step_count += 1
        return True

    def _open_window(self, P: Problem) -> None:
        """Opens ``P``'s window: its iterates start from its parameters and its twin
        optimizer from its torch state — or, for per-window variables, both start
        fresh from ``init_window`` on the window's one batch (its reads recorded)."""
        run = self.state[P.name]
        if not P.per_window:
            run.window = Window(FunctionalOptimizer.from_torch(P.optimizer, list(P.variables)))
            run.iterates = dict(zip(P.param_names, P.variables))
            return
        batch, reads = P.next_batch(), []
        nodes = self.graph.path_nodes(P.name)
        run.window = win = Window(None)   # open now: the steps share init_window's reads
        with second_order_kernels(True), reading(ReadContext(
                P, lambda S: self._alias(P, S, True, nodes, reads), own={})):
            result = P.init_window(_precision.to_device(batch, self._device))
        init = P.open_window(batch, result)
        win.fopt = FunctionalOptimizer.fresh(P.optimizer, len(init))
        win.add_reads(reads)

    def _discard_window(self, P: Problem) -> None:
        """Drops a window in which nothing stepped (also one that failed to open)."""
        run = self.state[P.name]
        run.window = None
        if P.per_window:
            P.close_window()
        else:
            run.iterates = None

    def _set_hyperparameters(self, P: Problem, diff: bool, reads: List[Read]) -> None:
        """Applies ``P.optimizer_hyperparameters()`` (e.g. a learnable lr) to every group."""
        if type(P).optimizer_hyperparameters is Problem.optimizer_hyperparameters:
            return
        nodes = self.graph.path_nodes(P.name)
        with reading(ReadContext(P, lambda S: self._alias(P, S, diff, nodes, reads))):
            hp = P.optimizer_hyperparameters() or {}
        self._learned_hp[P.name] = set(hp)
        groups = self.state[P.name].window.fopt.param_groups if diff else P.optimizer.param_groups
        for group in groups:
            for k, v in hp.items():
                if k not in group:
                    raise KeyError(f"problem {P.name!r}: optimizer_hyperparameters() returned "
                                   f"{k!r}, which {type(P.optimizer).__name__} does not have "
                                   f"(its hyperparameters: {sorted(x for x in group if x != 'params')})")
                group[k] = v if diff else _plain(v)

    @staticmethod
    def _clip(P: Problem, grads: List[Tensor]) -> List[Tensor]:
        c = P.config.grad_clip
        if c is None:
            return grads
        # Same formula as torch.nn.utils.clip_grad_norm_, but functional so that it
        # stays differentiable inside unrolled windows.
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
        coef = torch.clamp(c / (norm + 1e-6), max=1.0)
        return [x * coef for x in grads]

    def _alias(self, R: Problem, S: Problem, diff: bool, nodes, reads: List[Read], live: bool = False):
        """The state ``R``'s loss sees when it calls problem ``S``."""
        if S.name not in self.problems or self.problems[S.name] is not S:
            raise GraphError(f"problem {R.name!r} read problem {S.name!r}, which is not in this engine")
        if S.name not in self.graph.reads[R.name]:
            raise GraphError(
                f"problem {R.name!r} read the variables of {S.name!r}, but no dependency declares "
                f"it: add {S.name!r} to u2l[...]/l2u[...] (u2l={{{S.name!r}: [{R.name!r}]}} if "
                f"{S.name!r} is the upper, l2u={{{S.name!r}: [{R.name!r}]}} if it is the lower)")
        for r in reads:
            if r.source == S.name:
                return r.alias
        st = S.readable_state()
        if (self._exact or live) and S.name in self._windowed:
            # Exact nesting: the live iterates (no new graph); the top's backward
            # runs through every level's steps.
            reads.append(Read(S.name, st, st, live=True))
            return st
        track = diff or S.name in nodes or R.name not in self._linted   # (lint sees every first read)
        # A differentiable reader keeps its graph past this step; if S then steps in
        # place (torch.optim), the saved values would change under it. Clone then —
        # unless S is the only top problem and R lies on one of its paths: the top is
        # the last problem of an iteration, it backpropagates through R's window
        # before its own in-place step, and that window is closed (never
        # backpropagated again) at the end of the same iteration.
        swin = self.state[S.name].window
        rwin = self.state[R.name].window if diff else None
        if rwin is not None and swin is None and track:
            # Inside R's window, S has not stepped since an earlier step read it: the
            # same aliases serve (one set of leaves per window, not one per step).
            hit = rwin.shared.get(S.name)
            if hit is not None and hit[0] == S.step_count:
                reads.append(hit[1])
                return hit[1].alias
        clone = diff and swin is None and not (
            S.name == self._unique_top and R.name in self.graph.path_nodes(S.name))
        alias = {}
        for k, t in st.items():
            a = t.detach()
            if clone:
                a = a.clone()
            alias[k] = a.requires_grad_() if track else a
        r = Read(S.name, alias, st if swin is not None else None)
        if swin is not None:
            swin.referrers.append(r)
        elif rwin is not None and track:
            rwin.shared[S.name] = (S.step_count, r)
        reads.append(r)
        return alias

    def _close_window(self, name: str) -> None:
        run = self.state[name]
        win, run.window = run.window, None
        if win is None:
            return
        P = self.problems[name]
        if P.per_window:        # nothing to write back, nothing kept
            P.close_window()
        else:
            with torch.no_grad():
                for p, t in zip(P.variables, (run.iterates[k] for k in P.param_names)):
                    p.copy_(t)
            win.fopt.state_to_torch(P.optimizer, list(P.variables))
            run.iterates = None
        for r in win.referrers:   # truncate paths through the closed window
            r.src_state = None
        win.reads.clear()
        win.referrers.clear()

    # ------------------------------------------------------------- helpers
    @property
    def data_parallel(self) -> bool:
        """Whether the engine averages over ``torch.distributed`` ranks."""
        return self._dist

    def window(self, name: str) -> Optional[Window]:
        """Problem ``name``'s open window (its differentiable steps), or ``None``."""
        return self.state[name].window

    def windowed(self, name: str) -> bool:
        """Whether problem ``name`` steps through windows (its method's declaration)."""
        return name in self._windowed

    def open_windows(self) -> Dict[str, int]:
        """``{problem: steps taken}`` of every open window."""
        return self.state.open_windows()

    def optimizer_view(self, name: str) -> List[Mapping[str, Any]]:
        """Problem ``name``'s optimizer as its last update left it, one read-only mapping
        per variable: the group's hyperparameters, ``"state"`` (torch's per-parameter
        state), ``"grad"`` (the last gradient applied; ``None`` unless the problem's
        method declares ``needs=("optimizer",)`` and it has updated) and ``"type"``."""
        P = self.problems[name]
        group = {id(p): g for g in P.optimizer.param_groups for p in g["params"]}
        last = self._last_grad.get(name)
        out = []
        for i, p in enumerate(P.variables):
            d = {k: v for k, v in group[id(p)].items() if k != "params"}
            d.update(state=MappingProxyType(dict(P.optimizer.state.get(p, {}))),
                     grad=None if last is None else last[i], type=type(P.optimizer).__name__)
            out.append(MappingProxyType(d))
        return out

    def close_windows(self) -> None:
        """Writes all unrolled iterates back into the modules (e.g. before saving)."""
        for n in list(self.state.open_windows()):
            self._close_window(n)

    def counts(self) -> Dict[str, int]:
        """Updates taken per problem."""
        return {n: p.step_count for n, p in self.problems.items()}
