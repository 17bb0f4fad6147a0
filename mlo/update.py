"""One update of a problem: its loss, gradient and hypergradient, the guard, the step.

:class:`Updater` evaluates a problem's loss under a read context (the other problems'
states as :class:`mlo.windows.Windows` hands them over), takes the gradient of its
own variables, adds the sum over its hypergradient paths (:mod:`mlo.hypergrad`; or
the nesting strategy's one-backward top), runs the non-finite guard
(:mod:`mlo.guard`) and steps — in place with ``torch.optim``, or out of place inside
an unrolled window with the differentiable twin (:mod:`mlo.optim`). It returns an
:class:`UpdateResult` and records into the run state; it is also the
:class:`mlo.hypergrad.HypergradView` the hypergradient layer reads.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Set, Union

import torch
from torch import Tensor

import engines.base as methods

from . import lint, nonfinite
from . import precision as _precision
from .config import EngineConfig
from .graph import Graph
from .guard import describe_nonfinite, update_norms
from .hypergrad import combine_gradients, hypergradient, path_contribution, take_fresh_batches
from .consumed import check_paths_live
from .isolation import no_side_effects, rng_state
from .nesting import BettyNesting, one_backward_top_gradient
from .parallel import SingleProcess
from .problem import Problem
from .second_order import second_order_kernels
from .state import Read, ReadContext, RunState, reading
from .step import (apply_hyperparameters, check_solution, clip, step_by_solve, step_in_place, step_in_window,
                   step_scheduler)
from .windows import Windows

__all__ = ["Updater", "UpdateResult", "Gradient"]


@dataclass(frozen=True)
class UpdateResult:
    """What one update did.

    Attributes:
        applied: ``False`` when it was skipped (non-finite values, ``nonfinite="skip"``).
        extras: its ``training_step`` dict without ``"loss"`` (empty for a tensor loss).
    """

    applied: bool
    extras: Mapping[str, Any]


# The results without extras (most updates): made once.
_APPLIED, _SKIPPED = UpdateResult(True, MappingProxyType({})), UpdateResult(False, MappingProxyType({}))


@dataclass
class Gradient:
    """A problem's loss and gradient at the current state.

    Attributes:
        loss: the scalar loss; grads: the total gradient per variable (``None``: none).
        reads: the reads its loss made; out: what ``training_step`` returned.
        own, hyper, paths: with hypergradient paths, ``∂F/∂λ`` and the hypergradient
            per variable, and (``by_path``) each path's term.
    """

    loss: Tensor
    grads: List[Optional[Tensor]]
    reads: List[Read]
    out: Any = None
    own: Optional[Dict[str, Optional[Tensor]]] = None
    hyper: Optional[Dict[str, Tensor]] = None
    paths: Optional[Dict[tuple, Dict[str, Tensor]]] = None

    def parts(self) -> Dict[str, Any]:
        """``{"own": ..., "hyper": ..., "paths": ...}`` for the parts it has."""
        out: Dict[str, Any] = {}
        if self.own is not None:
            out["own"] = self.own
        if self.hyper is not None:
            out["hyper"] = self.hyper
        if self.paths is not None:
            out["paths"] = self.paths
        return out


def _not_a_loss(P: Problem, out: Any) -> TypeError:
    return TypeError(f"problem {P.name!r}: training_step must return a scalar tensor or a "
                     f"dict with a scalar 'loss', got {type(out).__name__}")


class Updater:
    """Updates of an engine's problems (see the module).

    Args:
        problems, graph, config, state: the engine's.
        windows: the engine's :class:`mlo.windows.Windows`.
        nesting: its nesting strategy; parallel: its data-parallel strategy.
        windowed: the problems that step through windows.
        keep_grad: the problems whose method reads the last gradient applied (SAMA).
        device: where batches go before a loss (``None``: where they are).
    """

    def __init__(self, problems: Mapping[str, Problem], graph: Graph, config: EngineConfig,
                 state: RunState, windows: Windows, nesting: BettyNesting, parallel: SingleProcess,
                 windowed: Set[str], keep_grad: Set[str], device: Optional[torch.device]):
        self.problems, self.graph, self.config, self.state = problems, graph, config, state
        self.windows, self.nesting, self.parallel = windows, nesting, parallel
        self._windowed, self.keep_grad, self.device = windowed, keep_grad, device
        # What never changes during a run, looked up once (an update is a hot path).
        self._runs = state.problems
        self._plain_loss = config.precision == "fp32" and device is None   # no autocast, no moves
        # The nesting strategy's answers for an update (no breakdown, no override), per problem.
        self._top_live = {n: nesting.top_reads_live(n, False, None) for n in problems}
        self._own_view = {n: nesting.own_view(n, True) for n in problems}
        self._nodes = {n: graph.path_nodes(n) for n in problems}
        # (the problems on each one's paths, sorted, and their methods: for error messages)
        self._nest = {n: (sorted(self._nodes[n]), [problems[m].config.method for m in sorted(self._nodes[n])])
                      for n in problems}
        # The problems whose updates call their own solver (Problem.solve) instead of a step.
        self._solved = {n for n, P in problems.items() if type(P).solve is not Problem.solve}
        # The problems with a lower on their paths that evaluates fresh batches (implicit_batch).
        self._takes_fresh = {n for n in problems if any(
            problems[m].config.implicit_batch == "fresh" and m not in windowed for m in self._nodes[n])}
        # The hypergradient view's settings.
        self.data_parallel: bool = parallel.enabled
        self.check_nonfinite: bool = config.nonfinite != "ignore"
        self.traces: List = []      # the current gradient's deferred origin traces (hypergrad)
        self.precision: str = config.precision

    # ------------------------------------------------ the hypergradient view
    def window(self, name: str):
        return self._runs[name].window

    def windowed(self, name: str) -> bool:
        return name in self._windowed

    def loss(self, P: Problem, batch) -> Tensor:
        """``P``'s scalar loss on ``batch`` (call it inside a read context)."""
        return self.evaluate(P, batch)[0]

    def evaluate(self, P: Problem, batch):
        """``(loss, out)``: ``P.training_step(batch)`` as the engine evaluates it (device,
        precision), ``out`` what it returned and ``loss`` its scalar loss as a 0-d tensor."""
        if self._plain_loss:
            out = P.training_step(batch)
        else:
            with _precision.autocast(self.config.precision, self.device):
                out = P.training_step(_precision.to_device(batch, self.device))
        if isinstance(out, Tensor):         # (the usual case, with a single check)
            loss = out
        else:
            loss = out.get("loss") if isinstance(out, dict) else None
            if not isinstance(loss, Tensor):
                raise _not_a_loss(P, out)
        if loss.ndim != 0 and loss.numel() != 1:
            raise _not_a_loss(P, out)
        if loss.dtype in (torch.bfloat16, torch.float16):
            loss = loss.float()
        return (loss if loss.ndim == 0 else loss.reshape(())), out

    def note_method(self, name: str, diagnostics: Dict[str, Any]) -> None:
        """Problem ``name``'s method's numbers about its last run (e.g. CG's iterations and
        final residual, Neumann's last term) go into ``state.records[name]``."""
        self.state.records[name].update(diagnostics)

    def inner_lr(self, name: str) -> Union[float, tuple]:
        """Problem ``name``'s learning rate: one float, or one per variable when its
        optimizer's param groups have different learning rates."""
        P = self.problems[name]
        groups = P.optimizer.param_groups
        if len(groups) == 1:      # (every variable is in it: the optimizer was made from them)
            return float(groups[0].get("lr", 1.0))
        lr = {id(p): float(g.get("lr", 1.0)) for g in groups for p in g["params"]}
        per = tuple(lr[id(p)] for p in P.variables)
        return per[0] if len(set(per)) == 1 else per

    def optimizer_view(self, name: str) -> List[Mapping[str, Any]]:
        """Problem ``name``'s optimizer as its last update left it, one read-only mapping
        per variable: the group's hyperparameters, ``"state"`` (torch's per-parameter
        state), ``"grad"`` (the last gradient applied; ``None`` unless the problem's
        method declares ``needs=("optimizer",)`` and it has updated) and ``"type"``."""
        P = self.problems[name]
        group = {id(p): g for g in P.optimizer.param_groups for p in g["params"]}
        last = self.state.last_grad.get(name)
        out = []
        for i, p in enumerate(P.variables):
            d = {k: v for k, v in group[id(p)].items() if k != "params"}
            d.update(state=MappingProxyType(dict(P.optimizer.state.get(p, {}))),
                     grad=None if last is None else last[i], type=type(P.optimizer).__name__)
            out.append(MappingProxyType(d))
        return out

    # ------------------------------------------------ gradients
    def evaluate_in_window(self, P: Problem, fn, batch):
        """``fn(batch)`` evaluated as a differentiable step of ``P``'s open window: its
        reads recorded in the window (a per-window problem's ``init_window``)."""
        reads: List[Read] = []
        with second_order_kernels(True), reading(ReadContext(P, self.windows.resolver(P, True, reads), own={})):
            result = fn(_precision.to_device(batch, self.device))
        self._runs[P.name].window.add_reads(reads)
        return result

    def gradient(self, P: Problem, batch, diff: bool, by_path: bool = False, override=None,
                 keep_graph: bool = False) -> Gradient:
        """``P``'s loss, total gradient (own + hypergradient) and reads.

        Args:
            diff: ``P`` steps through a window (its gradient is differentiated again later).
            by_path: also each path's term; override: ``(method, options)`` for every
                problem on ``P``'s paths instead of their own.
            keep_graph: keep the autograd graph (a report that must not free it).
        """
        name = P.name
        reads: List[Read] = []
        self.traces.clear()
        self._runs[name].last_batch = batch
        top_live = self.nesting.top_reads_live(name, by_path, override) \
            if by_path or override is not None else self._top_live[name]
        resolve = self.windows.resolver(P, diff, reads, top_live)
        own_view = {k: t.view_as(t) for k, t in P.own_state().items()} \
            if diff and self._own_view[name] else None
        grad_wrt = own_view
        if diff and self.parallel.enabled:
            # Inside a window the loss reads every variable through averaging views: its
            # gradient and every derivative of it are those of the global batch.
            resolve, own_view = self.parallel.reading_views(resolve, P.own_state(), P.param_names)
        ctx = reading(ReadContext(P, resolve, own=own_view))
        if diff:       # inside a window the loss's gradient is differentiated again later
            with second_order_kernels(True), ctx:
                loss, out = self.evaluate(P, batch)
        else:
            with ctx:
                loss, out = self.evaluate(P, batch)
        if name not in self.state.linted:     # once per problem: declared reads without gradient
            try:
                window = self._runs[name].window
                lint.check_reads(self.graph, self.problems, P, loss, reads,
                                 window.reads if window is not None else ())
            finally:
                self.state.linted.add(name)
        if top_live:
            runs, nest = self._runs, self._nodes[name]
            nest_reads = [r for n in nest if runs[n].window is not None for r in runs[n].window.reads]
            loss, total, parts = one_backward_top_gradient(P, loss, keep_graph, nest_reads, self._nest[name])
            return Gradient(loss, total, [], out, own=parts["own"], hyper=parts["hyper"])
        return self._own_and_paths(P, loss, out, reads, diff, grad_wrt, by_path, override)

    def _own_and_paths(self, P: Problem, loss: Tensor, out, reads: List[Read], diff: bool,
                       grad_wrt, by_path: bool, override) -> Gradient:
        name = P.name
        nodes = self._nodes[name]
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
            g = torch.autograd.grad(loss, own, create_graph=not P.first_order,
                                    allow_unused=True, retain_graph=bool(tracked) or None)
            ga = (torch.autograd.grad(loss, [a for *_, a in tracked], allow_unused=True,
                                      retain_graph=True) if tracked else ())
        else:
            wrt = own + [a for *_, a in tracked] if tracked else own
            allg = torch.autograd.grad(loss, wrt, allow_unused=True)
            if self.parallel.enabled:   # the mean over ranks: the global batch's gradient
                allg = self.parallel.average_gradients(allg, wrt)
            n = len(own)
            g, ga = allg[:n], allg[n:]
        if self.parallel.enabled:
            loss = self.parallel.average_loss(loss)
        if not tracked and all(x is None for x in g):
            raise RuntimeError(f"problem {name!r}: its loss does not depend on its own variables "
                               f"{P.param_names}; call the module through the problem (self(x)) "
                               f"or read self.params")
        if not tracked:
            # None where the loss does not use a variable: torch.optim skips it (no weight
            # decay, momentum or state update), and so do the twins and the SGD fast path.
            return Gradient(loss, list(g), reads, out)
        direct: Dict[Read, Any] = {}      # (reads hash by identity)
        for (r, k, a), x in zip(tracked, ga):
            if x is not None:
                if r not in direct:
                    direct[r] = (r.source, (r.src_state, {}))
                direct[r][1][1][k] = x
        direct_list = list(direct.values())
        paths = None
        if by_path:
            # Every variable in every path's entry: a path truncated at a closed
            # window (or not reaching some variable) contributes zeros, not nothing.
            paths = {}
            for p in self.graph.paths(name):
                c = path_contribution(self, p, direct_list, override)
                paths[p] = {k: c[k] if k in c else torch.zeros_like(t)
                            for k, t in zip(P.param_names, own)}
        h = hypergradient(self, name, direct_list, override)
        own_d, hyper_d, grads = combine_gradients(P.param_names, own, g, h)
        return Gradient(loss, grads, reads, out, own=own_d, hyper=hyper_d, paths=paths)

    def report(self, name: str, batch: Any = None, by_path: bool = False,
               method: Optional[tuple] = None) -> Dict[str, Any]:
        """``engine.gradient``: ``name``'s gradient at the current state, changing nothing
        (see :meth:`mlo.Engine.gradient`)."""
        if name not in self.problems:
            raise KeyError(f"no problem named {name!r} (known: {list(self.problems)})")
        P = self.problems[name]
        check_paths_live(self, name, by_path, method)
        if batch is None:
            batch = P.update_batch()
        if method is not None:
            if methods.info(method[0]).window:
                raise ValueError(f"gradient(method={method[0]!r}): a window method needs the "
                                 f"lower steps taken with it; give an implicit or finite-difference "
                                 f"method (e.g. ('cg', {{'max_iter': 50}}))")
            methods.check_options(method[0], method[1])
        with no_side_effects(self.problems.values(), rng_state()):
            res = self.gradient(P, batch, diff=False, by_path=by_path, override=method,
                                keep_graph=self.nesting.keeps_graph)
        self.traces.clear()         # (a report runs no guard: nothing to trace)
        st = P.own_state()
        out = {"loss": float(res.loss.detach()),       # (a report: zeros for no gradient)
               "grad": {k: torch.zeros_like(st[k]) if g is None else g.detach()
                        for k, g in zip(P.param_names, res.grads)}}
        out.update(res.parts())
        if res.own is not None:     # (an update's records keep None for an own gradient of zeros)
            out["own"] = {k: v if v is not None else torch.zeros_like(st[k]) for k, v in res.own.items()}
        return out

    # ------------------------------------------------ the update
    def update(self, P: Problem) -> UpdateResult:
        """One update of ``P``: gradient, guard, step; its records in the run state."""
        t0 = time.perf_counter()
        result = self._update(P)
        rec = self.state.records[P.name]
        if result.applied:
            rec["updates"] += 1
        else:
            rec["skipped"] = rec.get("skipped", 0) + 1
        rec["seconds"] += time.perf_counter() - t0
        return result

    def _update(self, P: Problem) -> UpdateResult:
        """An exception before the optimizer step changes nothing of ``P`` that a retry
        would see: its parameters, optimizer state, counters, records and window, and
        the batch it took, which becomes its next batch again. (Random draws and
        BatchNorm statistics of a forward that ran before the exception are not
        rolled back: Ctrl-C inside ``run`` waits for the iteration's end instead.)"""
        name = P.name
        if name in self._solved:
            return self._update_by_solve(P)
        diff = name in self._windowed
        run = self._runs[name]
        opened = diff and run.window is None
        last_batch = run.last_batch
        P.begin_taking()
        try:
            if opened:
                self.windows.open(P, self.evaluate_in_window)
            res = self.gradient(P, P.update_batch(), diff)
            if self.config.nonfinite == "ignore":
                vals, bad = [res.loss.item()], ""
            else:
                parts = res.parts() if res.hyper is not None else {}
                vals = update_norms(res.loss, res.grads, parts)
                bad = "" if all(map(math.isfinite, vals)) else self._describe_nonfinite(P, vals, res, parts)
            self.traces.clear()
            if bad and self.config.nonfinite == "raise":
                raise FloatingPointError(
                    f"{bad}; its parameters and optimizer state are unchanged. "
                    f"EngineConfig(nonfinite='skip') skips such updates with a warning instead")
            grads = res.grads
            if not bad:
                if P.config.grad_clip is not None:
                    grads = clip(P, grads)
                if type(P).optimizer_hyperparameters is not Problem.optimizer_hyperparameters:
                    self._set_hyperparameters(P, diff, res.reads)
        except BaseException:
            if opened:          # nothing stepped in it: as if it had never been opened
                self.windows.discard(P)
            P.return_taken()
            run.last_batch = last_batch
            raise
        if name in self._takes_fresh:       # (implicit_batch="fresh" lowers: the batch it used)
            take_fresh_batches(self, name)
        if bad:
            if opened:
                self.windows.discard(P)
            warnings.warn(f"{bad}: update skipped; its parameters and optimizer state are "
                          f"unchanged", RuntimeWarning, stacklevel=5)
            return _SKIPPED
        self._record(P, vals, res)
        run.last_loss = res.loss.detach()
        if diff:
            learned = self.state.learned_hp.get(name, ()) if P.scheduler is not None else ()
            step_in_window(P, run, grads, res.reads, learned)
        else:
            if name in self.keep_grad:
                self.state.last_grad[name] = [None if g is None else g.detach() for g in grads]
            step_in_place(P, grads)
        if P.scheduler is not None:
            step_scheduler(P, diff)
        run.step_count += 1
        if P.config.implicit_batch == "window":
            self.state.note_window_batch(name, run.last_batch)
        out = res.out
        if isinstance(out, dict) and len(out) > 1:      # (extras besides its "loss")
            return UpdateResult(True, {k: v for k, v in out.items() if k != "loss"})
        return _APPLIED

    def _describe_nonfinite(self, P: Problem, vals: List[float], res: Gradient, parts) -> str:
        """What went non-finite in ``P``'s update, with the lower whose re-evaluated loss
        was to blame (the best responses' deferred traces run now, in order)."""
        try:
            for trace in self.traces:
                trace()
            return describe_nonfinite(P, vals, res.grads, parts, self.state.iteration)
        finally:
            nonfinite.clear(self.problems.values())

    def _update_by_solve(self, P: Problem) -> UpdateResult:
        """An update of ``P`` by ``P.solve(batch)`` (:meth:`mlo.Problem.solve`): the checked
        solution, its loss on the batch (the record; implicit methods evaluate there), the
        non-finite guard, then the solution written. Nothing changes when it raises."""
        run = self._runs[P.name]
        last_batch = run.last_batch
        P.begin_taking()
        try:
            batch = P.update_batch()
            with self._detached_reads(P, None):
                sol = P.solve(batch if self.device is None else _precision.to_device(batch, self.device))
            sol = check_solution(P, sol)
            with torch.no_grad(), self._detached_reads(P, sol):
                loss, out = self.evaluate(P, batch)
            run.last_batch = batch
            bad = self.config.nonfinite != "ignore" and not (
                math.isfinite(float(loss)) and all(bool(torch.isfinite(t).all()) for t in sol.values()))
            if bad and self.config.nonfinite == "raise":
                raise FloatingPointError(
                    f"problem {P.name!r}: solve(batch) at iteration {self.state.iteration} gave a "
                    f"non-finite solution or loss ({float(loss)}); its variables are unchanged")
        except BaseException:
            P.return_taken()
            run.last_batch = last_batch
            raise
        if bad:
            warnings.warn(f"problem {P.name!r}: solve(batch) at iteration {self.state.iteration} gave "
                          f"a non-finite solution or loss: update skipped; its variables are "
                          f"unchanged", RuntimeWarning, stacklevel=5)
            return _SKIPPED
        step_by_solve(P, sol)
        rec = self.state.records[P.name]
        rec["loss"], rec["grad_norm"] = float(loss), None
        run.last_loss = loss.detach()
        run.step_count += 1
        if P.config.implicit_batch == "window":
            self.state.note_window_batch(P.name, batch)
        if isinstance(out, dict) and len(out) > 1:      # (extras besides its "loss")
            return UpdateResult(True, {k: v for k, v in out.items() if k != "loss"})
        return _APPLIED

    def _detached_reads(self, P: Problem, own: Optional[Dict[str, Tensor]]) -> reading:
        """The read context of ``P.solve``: other problems' states as detached values, and
        ``P``'s own as ``own`` (``None``: its current values, detached)."""
        base = self.windows.resolver(P, False, [])
        if own is None:
            own = {k: t.detach() for k, t in P.own_state().items()}
        return reading(ReadContext(P, lambda s: {k: t.detach() for k, t in base(s).items()}, own=own))

    def _record(self, P: Problem, vals: List[float], res: Gradient) -> None:
        """``vals``: ``[loss, ‖grad‖, ‖own‖, ‖hyper‖]`` (``[loss]`` with nonfinite='ignore')."""
        rec = self.state.records[P.name]
        norms = len(vals) > 1
        rec["loss"], rec["grad_norm"] = vals[0], vals[1] if norms else None
        if res.hyper is not None:
            self.state.last_hypergradient[P.name] = res.hyper
            rec["own_grad_norm"], rec["hypergrad_norm"] = (vals[2], vals[3]) if norms else (None, None)

    def _set_hyperparameters(self, P: Problem, diff: bool, reads: List[Read]) -> None:
        """Applies ``P.optimizer_hyperparameters()`` (read under ``P``'s read context)."""
        with reading(ReadContext(P, self.windows.resolver(P, diff, reads))):
            hp = P.optimizer_hyperparameters() or {}
        groups = self._runs[P.name].window.fopt.param_groups if diff else P.optimizer.param_groups
        self.state.learned_hp[P.name] = apply_hyperparameters(P, hp, groups, diff)
