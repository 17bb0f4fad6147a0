"""The engine's updates: a problem's loss, its gradient and hypergradient, its step.

:class:`UpdateMixin` is part of :class:`mlo.Engine`. One update of a problem
evaluates its loss under a read context (the other problems' states as
:mod:`mlo.reads` hands them over), takes the gradient of its own variables, adds the
sum over its hypergradient paths (:mod:`mlo.hypergrad`; or the fused/exact top's
single backward), runs the non-finite guard (:mod:`mlo.guard`) and steps — in place
with ``torch.optim``, or out of place inside an unrolled window with the
differentiable twin (:mod:`mlo.optim`).
"""
from __future__ import annotations

import math
import time
import warnings
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor

import engines.base as eb

from . import distributed as _dist
from . import lint as _lint
from . import precision as _precision
from .guard import combine_gradients, describe_nonfinite, update_norms
from .hypergrad import hypergradient, path_contribution, second_order_kernels
from .inplace import sgd_step
from .isolation import no_side_effects, rng_state
from .problem import Problem
from .state import Read, ReadContext, reading

__all__ = ["UpdateMixin"]


def _plain(v):
    """A hyperparameter for ``torch.optim``: tensors become floats, also inside tuples (betas)."""
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(x) for x in v)
    return float(v.detach()) if isinstance(v, Tensor) else v


class UpdateMixin:
    """Loss, gradient, hypergradient and step of one problem's update."""

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
        if diff:
            with second_order_kernels(True), reading(ReadContext(P, resolve, own=own_view)):
                loss = self.loss(P, batch)
        else:
            with reading(ReadContext(P, resolve, own=own_view)):
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
        extra: Dict[str, Any] = {}
        if not tracked:
            # None where the loss does not use a variable: torch.optim skips it (no weight
            # decay, momentum or state update), and so do the twins and the SGD fast path.
            grads = list(g)
        else:
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
            own_d, hyper_d, grads = combine_gradients(P.param_names, own, g, h)
            extra["own"], extra["hyper"] = own_d, hyper_d
        return loss, grads, reads, extra

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
        st = P.own_state()
        out = {"loss": float(loss.detach()),       # (a report: zeros for no gradient)
               "grad": {k: torch.zeros_like(st[k]) if g is None else g.detach()
                        for k, g in zip(P.param_names, grads)}}
        out.update(extra)
        if "own" in extra:     # (an update's records keep None for an own gradient of zeros)
            out["own"] = {k: v if v is not None else torch.zeros_like(st[k])
                          for k, v in extra["own"].items()}
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

    def _record(self, P: Problem, vals: List[float], extra: Dict[str, Any]) -> None:
        """``vals``: ``[loss, ‖grad‖, ‖own‖, ‖hyper‖]`` (``[loss]`` with nonfinite='ignore')."""
        rec = self.records[P.name]
        rec["loss"], rec["grad_norm"] = vals[0], vals[1] if len(vals) > 1 else None
        if "hyper" in extra:
            self.last_hypergradient[P.name] = extra["hyper"]
            rec["own_grad_norm"], rec["hypergrad_norm"] = (vals[2], vals[3]) if len(vals) > 1 else (None, None)

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
            if self.config.nonfinite == "ignore":
                vals, bad = [loss.item()], ""
            else:
                vals = update_norms(loss, grads, extra)
                bad = "" if all(map(math.isfinite, vals)) else describe_nonfinite(
                    P, vals, grads, extra, self.iteration)
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
                self._last_grad[name] = [None if gi is None else gi.detach() for gi in grads]
            variables = P.variables
            if P.scheduler is not None or not sgd_step(P.optimizer, variables, grads):
                for p, gi in zip(variables, grads):     # (None: torch.optim skips p)
                    p.grad = gi.detach() if gi is not None and gi.requires_grad else gi
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

    def _set_hyperparameters(self, P: Problem, diff: bool, reads: List[Read]) -> None:
        """Applies ``P.optimizer_hyperparameters()`` (e.g. a learnable lr) to the param
        groups: a value to every group, a list one entry per group (in order)."""
        if type(P).optimizer_hyperparameters is Problem.optimizer_hyperparameters:
            return
        nodes = self.graph.path_nodes(P.name)
        with reading(ReadContext(P, lambda S: self._alias(P, S, diff, nodes, reads))):
            hp = P.optimizer_hyperparameters() or {}
        if not isinstance(hp, Mapping):
            raise TypeError(f"problem {P.name!r}: optimizer_hyperparameters() must return a dict "
                            f"{{name: value}} (a list value gives one entry per param group), got "
                            f"{type(hp).__name__}")
        self._learned_hp[P.name] = set(hp)
        groups = self.state[P.name].window.fopt.param_groups if diff else P.optimizer.param_groups
        opt = type(P.optimizer).__name__
        for k, v in hp.items():
            if not isinstance(k, str) or k == "params" or k not in groups[0]:
                raise KeyError(f"problem {P.name!r}: optimizer_hyperparameters() returned "
                               f"{k!r}, which {opt} does not have (its hyperparameters: "
                               f"{sorted(x for x in groups[0] if x != 'params')})")
            per = isinstance(v, list)
            if per and len(v) != len(groups):
                raise ValueError(
                    f"problem {P.name!r}: optimizer_hyperparameters()[{k!r}] is a list of {len(v)} "
                    f"value(s), one per param group, but its {opt} has {len(groups)} param group(s); "
                    f"give exactly one value per group (in param-group order), or one value that is "
                    f"not a list (e.g. a tensor, or a tuple for betas) for every group")
            for i, group in enumerate(groups):
                x = v[i] if per else v
                was = group[k]
                if isinstance(was, (tuple, list)) and not (isinstance(x, (tuple, list)) and len(x) == len(was)):
                    where = f"[{k!r}][{i}]" if per else f"[{k!r}]"
                    raise ValueError(
                        f"problem {P.name!r}: optimizer_hyperparameters(){where} is {x!r}, but {opt}'s "
                        f"{k!r} takes {len(was)} values like {tuple(was)!r} (a tuple for every group, "
                        f"or a list with one such tuple per param group)")
                group[k] = x if diff else _plain(x)

    @staticmethod
    def _clip(P: Problem, grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        c = P.config.grad_clip
        if c is None or all(x is None for x in grads):
            return grads
        # Same formula as torch.nn.utils.clip_grad_norm_ (which skips parameters without
        # a gradient), but functional so that it stays differentiable inside unrolled windows.
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads if x is not None]))
        coef = torch.clamp(c / (norm + 1e-6), max=1.0)
        return [None if x is None else x * coef for x in grads]

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
