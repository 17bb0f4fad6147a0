"""The engine's non-finite guard: the norms of an update and what went wrong.

:class:`GuardMixin` is part of :class:`mlo.Engine`: before every optimizer step the
update's loss, own gradient and hypergradient norms are computed once (shared with
``engine.records``) and checked; a NaN or an infinity is described by problem,
iteration and quantity (:mod:`mlo.engine` raises or skips).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .problem import Problem

__all__ = ["GuardMixin"]


def _combine(part: List[float]) -> float:
    """The norm of a group from its tensors' norms, in double precision (inf when one is
    infinite, nan when one is nan)."""
    try:
        return math.sqrt(math.fsum([x * x for x in part]))
    except (OverflowError, ValueError):    # (fsum of inf and nan, or of -inf and inf)
        return math.nan if any(map(math.isnan, part)) else math.inf


class GuardMixin:
    """Norms of an update and the non-finite diagnosis."""

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
        norm = torch.linalg.vector_norm
        if "hyper" not in extra and hint is None and loss.device.type == "cpu":
            # The common update (own gradient only, on the CPU): each value read
            # directly — there is no synchronisation to save.
            vals = [norm(t.detach() if t.requires_grad else t).item() for t in grads]
            return [loss.item(), _combine(vals)]
        loss = loss.detach()
        groups = [grads]
        if "hyper" in extra:
            groups += [list(extra["own"].values()), list(extra["hyper"].values())]
        ns = [loss]
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
        if loss.device.type == "cpu" and all(n.device.type == "cpu" for n in ns):
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
        out, i = [flat[0]], 0
        for g in groups:
            out.append(_combine([flat[j] if j >= 0 else 0.0 for j in idx[i:i + len(g)]]))
            i += len(g)
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
