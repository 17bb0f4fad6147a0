"""The engine's non-finite guard: an update's norms and what went wrong.

Before every optimizer step the update's loss, own gradient and hypergradient norms
are computed once (:func:`update_norms`, shared with ``engine.records``) and checked;
a NaN or an infinity is described by problem, iteration and quantity
(:func:`describe_nonfinite`; the updater raises or skips).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .problem import Problem

__all__ = ["update_norms", "describe_nonfinite", "combine_gradients"]


def _combine(part: List[float]) -> float:
    """The norm of a group from its tensors' norms, in double precision (inf when one is
    infinite, nan when one is nan)."""
    try:
        return math.sqrt(math.fsum([x * x for x in part]))
    except (OverflowError, ValueError):    # (fsum of inf and nan, or of -inf and inf)
        return math.nan if any(map(math.isnan, part)) else math.inf


def _group_norm(ts: Sequence[Optional[Tensor]]) -> float:
    """The norm of a group of CPU tensors: each tensor's norm read directly, combined
    (``None``, no gradient, counts as zeros)."""
    norm = torch.linalg.vector_norm
    return _combine([norm(t.detach() if t.requires_grad else t).item() for t in ts if t is not None])


def combine_gradients(names: Sequence[str], like: Sequence[Tensor], own: Sequence[Optional[Tensor]],
                      hyper: Dict[str, Tensor]) -> Tuple[Dict[str, Optional[Tensor]], Dict[str, Tensor],
                                                         List[Optional[Tensor]]]:
    """An update's gradient from its own part and its hypergradient, per variable.

    Args:
        names: the variables' names; ``like``: their tensors (dtype, shape).
        own: ``∂F/∂λ`` per variable, ``None`` where the loss does not read it.
        hyper: the hypergradient by name (a variable no path reaches is absent).

    Returns:
        ``(own, hyper, total)``: the records — ``own`` keeps ``None`` for zeros (no
        tensor is made for them), ``hyper`` is detached, zeros where absent (a report,
        ``engine.last_hypergradient``) — and the total to step with, ``own + hyper``
        (``hyper`` itself, not ``0 + hyper``, where the own part is zero; it keeps any
        graph ``hyper`` has), ``None`` where both are absent: the variable has no
        gradient and ``torch.optim`` (or the window's twin) skips it — no weight decay,
        no momentum, no state update — as it skips a parameter whose ``.grad`` is ``None``.
    """
    own_d: Dict[str, Optional[Tensor]] = {}
    hyper_d: Dict[str, Tensor] = {}
    total: List[Optional[Tensor]] = []
    for k, t, x in zip(names, like, own):
        own_d[k] = x if x is None or not x.requires_grad else x.detach()
        h = hyper.get(k)
        if h is None:
            hyper_d[k] = torch.zeros_like(t)
            total.append(x)
            continue
        h = h.to(t.dtype)
        hyper_d[k] = h.detach() if h.requires_grad else h
        total.append(h if x is None else x + h)
    return own_d, hyper_d, total


def update_norms(loss: Tensor, grads: List[Optional[Tensor]], extra: Dict[str, Any]) -> List[float]:
    """``[loss, ‖grad‖, ‖own‖, ‖hyper‖]`` (the last two when it has paths) as floats:
    every distinct tensor's norm once, in its own dtype (a float64 norm of a float32
    tensor costs ~25× more: a hot path), each group's norm combined on the host in
    double precision. ``None`` (no gradient) stands for zeros (norm 0); a tensor in two groups
    (the total gradient ``0 + h`` is ``h``) is normed once. On the CPU each value
    is read directly (there is no synchronisation to save), elsewhere the norms are
    stacked and read at once."""
    cpu = loss.device.type == "cpu"
    paths = "hyper" in extra
    groups = [grads]
    if paths:
        groups += [list(extra["own"].values()), list(extra["hyper"].values())]
    if cpu and not paths:                  # the common update: its own gradient only
        return [loss.item(), _group_norm(grads)]
    if cpu and all(o is None for o in groups[1]) and \
            all(a is b or a is None for a, b in zip(grads, groups[2])):
        h = _group_norm(grads)             # the top of a hypergradient: total = hyper
        return [loss.item(), h, 0.0, h]
    norm = torch.linalg.vector_norm
    ns = [loss.detach()]
    at: Dict[int, int] = {}
    idx: List[int] = []          # per entry of the groups: its norm's index in ns (-1: zeros)
    for g in groups:
        for t in g:
            if t is None:
                idx.append(-1)
                continue
            j = at.get(id(t))
            if j is None:
                j = at[id(t)] = len(ns)
                ns.append(norm(t.detach() if t.requires_grad else t))
            idx.append(j)
    if cpu:
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
    return (f"problem {P.name!r}: non-finite {' and '.join(what)} at iteration {iteration} "
            f"(its update {P.step_count + 1})")
