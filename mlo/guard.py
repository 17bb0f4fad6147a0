"""The engine's non-finite guard: an update's norms and what went wrong.

Before every optimizer step the update's loss, own gradient and hypergradient norms
are computed once (:func:`update_norms`, shared with ``engine.records``) and checked;
a NaN or an infinity is described by problem, iteration and quantity
(:func:`describe_nonfinite`; the updater raises or skips) and, for a hypergradient, by
the lower whose loss a best response re-evaluated to a NaN (:mod:`mlo.nonfinite`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import fastpath, nonfinite
from .problem import Problem

__all__ = ["update_norms", "describe_nonfinite"]


def _group_norm(ts: Sequence[Optional[Tensor]]) -> float:
    """The norm of a group of tensors, the plain way: each tensor's norm (in its own
    dtype) read with ``.item()``, combined in double precision (``None``, no gradient,
    counts as zeros)."""
    norm = torch.linalg.vector_norm
    return fastpath.combine_norms([norm(t.detach()).item() for t in ts if t is not None])


def update_norms(loss: Tensor, grads: List[Optional[Tensor]], extra: Dict[str, Any]) -> List[float]:
    """``[loss, ‖grad‖, ‖own‖, ‖hyper‖]`` (the last two when it has paths) as floats;
    ``None`` (no gradient) stands for zeros. With the fast paths on
    (:mod:`mlo.fastpath`) the fewest norms and host reads that give these values
    (:func:`mlo.fastpath.norms`); off, each tensor's norm in its own dtype, read on its
    own, each group combined on the host in double precision: the same floats."""
    groups = [grads]
    if "hyper" in extra:
        groups += [list(extra["own"].values()), list(extra["hyper"].values())]
    fast = fastpath.norms(loss, groups)
    if fast is not None:
        return fast
    return [loss.item()] + [_group_norm(g) for g in groups]


def describe_nonfinite(P: Problem, vals: List[float], grads: List[Optional[Tensor]],
                       extra: Dict[str, Any], iteration: int) -> str:
    """What went non-finite in an update (``""`` when nothing did)."""
    if all(math.isfinite(v) for v in vals):
        return ""

    def where(ts):
        bad = [k for k, t in zip(P.param_names, ts)
               if t is not None and not bool(torch.isfinite(t.detach()).all())]
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
    # which lower's loss a best response re-evaluated to a NaN (mlo.nonfinite)
    origins = "; ".join(nonfinite.describe(o, P.name) for o in nonfinite.take(P))
    return (f"problem {P.name!r}: non-finite {' and '.join(what)} at iteration {iteration} "
            f"(its update {P.step_count + 1})" + (f": {origins}" if origins else ""))
