"""Applying an update's gradient: the optimizer step and what shapes it.

In place with ``torch.optim`` (or the SGD fast path, :mod:`mlo.fastpath`), or out of
place inside an unrolled window with the differentiable twin (:mod:`mlo.optim`);
learned optimizer hyperparameters (``Problem.optimizer_hyperparameters()``) written
into the param groups; gradient clipping that stays differentiable. Plain functions
of a problem, its gradient and its run state, called by :class:`mlo.update.Updater`.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import torch
from torch import Tensor

from .fastpath import sgd_step
from .problem import Problem
from .state import ProblemRun, Read

__all__ = ["step_in_window", "step_in_place", "step_by_solve", "check_solution", "step_scheduler",
           "apply_hyperparameters", "clip"]


def _float_hyperparameter(v):
    """A hyperparameter for ``torch.optim``: tensors become floats, also inside tuples (betas)."""
    if isinstance(v, (tuple, list)):
        return type(v)(_float_hyperparameter(x) for x in v)
    return float(v.detach()) if isinstance(v, Tensor) else v


def step_in_window(P: Problem, run: ProblemRun, grads: Sequence[Optional[Tensor]], reads: List[Read],
                   learned: Set[str]) -> None:
    """One differentiable step of ``P``'s open window: new iterates, the step's reads
    recorded. A scheduler's values reach the twin (except ``learned`` hyperparameters)."""
    win = run.window
    if P.scheduler is not None:
        # Schedulers change torch's param groups; the twin reads its own copy.
        for tg, fg in zip(P.optimizer.param_groups, win.fopt.param_groups):
            for k in fg:
                if k not in learned and k in tg:
                    fg[k] = tg[k]
    st, names = P.own_state(), P.param_names
    new = win.fopt.step([st[k] for k in names], grads)
    run.iterates = dict(zip(names, new))
    win.add_reads(reads)
    win.steps += 1


def step_in_place(P: Problem, grads: Sequence[Optional[Tensor]]) -> None:
    """``P``'s ``torch.optim`` step with ``grads`` (``None``: no gradient, skipped by the
    optimizer as torch skips a parameter whose ``.grad`` is ``None``)."""
    variables = P.variables
    if P.scheduler is not None or not sgd_step(P.optimizer, variables, grads):
        for p, gi in zip(variables, grads):
            p.grad = gi.detach() if gi is not None and gi.requires_grad else gi
        P.optimizer.step()
        for p in variables:
            p.grad = None


def check_solution(P: Problem, values: Any) -> Dict[str, Tensor]:
    """``P.solve(batch)``'s result checked against ``P``'s variables: a mapping with exactly
    their names, each a tensor of the variable's shape and dtype. Returns it detached."""
    if not isinstance(values, Mapping):
        raise TypeError(f"problem {P.name!r}: solve(batch) must return a dict {{variable name: "
                        f"tensor}} for {P.param_names}, got {type(values).__name__}")
    own = P.own_state()
    missing = [k for k in P.param_names if k not in values]
    unknown = [k for k in values if k not in own]
    if missing or unknown:
        raise KeyError(f"problem {P.name!r}: solve(batch) must return exactly its variables "
                       f"{P.param_names}; missing {missing}, unknown {unknown}")
    out = {}
    for k in P.param_names:
        v, t = values[k], own[k]
        if not isinstance(v, Tensor):
            raise TypeError(f"problem {P.name!r}: solve(batch)[{k!r}] must be a tensor, got "
                            f"{type(v).__name__}")
        if tuple(v.shape) != tuple(t.shape):
            raise ValueError(f"problem {P.name!r}: solve(batch)[{k!r}] has shape {tuple(v.shape)}, "
                             f"the variable has {tuple(t.shape)}")
        if v.dtype != t.dtype:
            raise TypeError(f"problem {P.name!r}: solve(batch)[{k!r}] has dtype {v.dtype}, the "
                            f"variable has {t.dtype}")
        out[k] = v.detach()
    return out


def step_by_solve(P: Problem, values: Mapping[str, Tensor]) -> None:
    """``P``'s update by its own solver: the checked solution (:func:`check_solution`)
    becomes its variables, as :meth:`mlo.Problem.set_params` writes them (constants)."""
    P.set_params(values)


def step_scheduler(P: Problem, in_window: bool) -> None:
    """``P``'s scheduler step after an update (none: nothing)."""
    if P.scheduler is None:
        return
    if in_window:    # the twin stepped for torch.optim: torch's order check would misfire
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            P.scheduler.step()
    else:
        P.scheduler.step()


def apply_hyperparameters(P: Problem, hp: Any, groups: List[dict], in_window: bool) -> Set[str]:
    """Writes ``P.optimizer_hyperparameters()``'s result ``hp`` (e.g. a learnable lr) into
    ``groups`` — a value to every group, a list one entry per group (in order) — after
    checking every value (nothing is written when one is wrong). Returns the keys."""
    if not isinstance(hp, Mapping):
        raise TypeError(f"problem {P.name!r}: optimizer_hyperparameters() must return a dict "
                        f"{{name: value}} (a list value gives one entry per param group), got "
                        f"{type(hp).__name__}")
    opt = type(P.optimizer).__name__
    writes = []
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
            writes.append((group, k, x))
    for group, k, x in writes:
        group[k] = x if in_window else _float_hyperparameter(x)
    return set(hp)


def clip(P: Problem, grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """``P.config.grad_clip``: the gradients scaled to that total norm at most."""
    c = P.config.grad_clip
    if c is None or all(x is None for x in grads):
        return grads
    # Same formula as torch.nn.utils.clip_grad_norm_ (which skips parameters without
    # a gradient), but functional so that it stays differentiable inside unrolled windows.
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads if x is not None]))
    coef = torch.clamp(c / (norm + 1e-6), max=1.0)
    return [None if x is None else x * coef for x in grads]
