"""Finite-difference hypergradients (DARTS, central differences).

DARTS (Liu et al., 2019, eq. 7–8) replaces the inverse Hessian of the
implicit-function-theorem formula by ``η·I`` (or ``I``) and the mixed
second derivative by a central difference of first derivatives::

    (dθ*/dx)ᵀ v ≈ −s · ∂²_{xθ} f · v
                ≈ −s · [∇x f(θ + εv, x) − ∇x f(θ − εv, x)] / (2ε),
    ε = epsilon / ‖v‖,

with ``s = lower.lr`` when ``scale_by_lr`` and ``s = 1`` otherwise (per-tensor
rates ``η_i`` give ``H⁻¹ ≈ diag(η_i I)``: ``v`` is scaled tensor by tensor). Two
gradient evaluations, no Hessian-vector products. The perturbed parameters
``θ ± εv`` are new tensors passed to ``lower.loss_fn``; ``lower.params`` are
never modified (no in-place edit of ``.data``).

Low precision. When the loss sees the parameters in bfloat16 or float16 — the
variables' own dtype, or autocast's (``Lower.compute_dtype``, set by the engine under
``EngineConfig(precision="bf16")``) — ``θ ± εv`` is rounded to that format before it
matters. bfloat16 keeps 8 significant bits: its relative spacing is ``u = 2⁻⁷ ≈ 7.8e-3``,
so a perturbation ``εv`` of relative size ``r = ‖εv‖/‖θ‖ = epsilon/‖θ‖`` moves a typical
element by ``r/u`` rounding steps, the rounding error of the effective perturbation is
of relative size ``~u/r``, and the difference quotient cannot be better than ~1e-2
relative even at ``r ≈ 1``. When ``r < u`` (the perturbation is below one rounding step
of a typical parameter) the result is mostly rounding error: on MLO-MAE's ``cpu`` preset
(‖θ‖ ≈ 45) in bf16, the mask hypergradient's relative error to the fp32 one at the
same ε is ≈ 0.075·u/r (cosine 0.96, 0.75, 0.39, −0.01 at epsilon 0.1, 0.03, 0.01,
0.003). Then a ``RuntimeWarning`` names the problem, once per (problem, method,
epsilon) in a process. The values are not changed (evaluating the perturbed losses in
float32 inside autocast is not done); ``epsilon ≥ u·‖θ‖``, ``precision="fp32"``, or
CG / Neumann (no difference quotient) are the ways out.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import (Lower, check_bool, check_number, detach_all, fill_unreached, grad_mode, no_inputs_reached,
                   register, zeros_like_all)

__all__ = ["finite_difference", "central_difference"]

Tensors = Tuple[Tensor, ...]

# Formats whose rounding a perturbation must clear (float16's spacing and coarser:
# bfloat16, float16) — see "Low precision" in the module docstring.
_LOW_EPS = torch.finfo(torch.float16).eps
_WARNED_PRECISION: set = set()     # (label, method, epsilon) already warned about


def _seen_as(dtype: torch.dtype, compute: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the loss sees a variable of ``dtype`` in under autocast to ``compute``
    (autocast leaves float64 alone and never raises precision)."""
    if compute is None or dtype == torch.float64 or torch.finfo(compute).eps <= torch.finfo(dtype).eps:
        return dtype
    return compute


def _warn_precision(lower: Lower, dtypes, epsilon: float, pnorm: float, *, method: str, option: str,
                    symbol: str) -> None:
    """The low-precision warning of the module docstring (once per problem, method, epsilon)."""
    seen = [(_seen_as(d, lower.compute_dtype), d) for d in dtypes]
    low, own = max(seen, key=lambda s: torch.finfo(s[0]).eps, default=(None, None))
    if low is None or torch.finfo(low).eps < _LOW_EPS or not (math.isfinite(pnorm) and pnorm > 0):
        return
    u, ratio = torch.finfo(low).eps, epsilon / pnorm
    key = (lower.label, method, epsilon)
    if ratio >= u or key in _WARNED_PRECISION:
        return
    _WARNED_PRECISION.add(key)
    name = str(low).replace("torch.", "")
    how = "the parameters' dtype" if low == own else "autocast"
    warnings.warn(
        f"{lower.label + ': ' if lower.label else ''}{method}: {option}={epsilon!r} is below what "
        f"{name} ({how}) resolves: the perturbation ε{symbol} is {ratio:.2g} of ‖θ‖ = {pnorm:.3g}, "
        f"under {name}'s relative spacing {u:.2g}, so where the loss computes in {name}, θ ± ε{symbol} "
        f"moves θ by less than one rounding step and this hypergradient can be mostly rounding "
        f"error (MLO-MAE's cpu preset in bf16 at a ratio of 2e-4: cosine 0.39 to fp32). Use "
        f"{option} >= {u * pnorm:.3g}, precision='fp32', or a method without a difference quotient "
        f"(cg, neumann)",
        RuntimeWarning, stacklevel=4)


def _grad_inputs(lower: Lower, params: Tensors, inputs: Tensors, create_graph: bool,
                 minus: Tensors = None) -> Tensors:
    """``∇x f(params, x)`` (``∇x [f(params, x) − f(minus, x)]`` when ``minus`` is given)
    with zeros (``None`` under ``lower.unused_as_none``) for inputs the loss does not read."""
    with grad_mode(True):
        loss = lower.loss_fn(params, inputs)
        if minus is not None:
            loss = loss - lower.loss_fn(minus, inputs)
        if not loss.requires_grad:
            return no_inputs_reached(lower)
        grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    return fill_unreached(lower, grads)


def _check(*, epsilon: float = 0.01, scale_by_lr: bool = False, create_graph: bool = False) -> None:
    check_number("finite_difference", "epsilon", epsilon)
    check_bool("finite_difference", "scale_by_lr", scale_by_lr)
    check_bool("finite_difference", "create_graph", create_graph)


@register("darts", check=_check, second_order=False)
@register("finite_difference", check=_check, second_order=False)
def finite_difference(lower: Lower, v: Sequence[Tensor], *, epsilon: float = 0.01,
                      scale_by_lr: bool = False, create_graph: bool = False) -> Tensors:
    """``(dθ*/dx)ᵀ v ≈ −s [∇x f(θ+εv, x) − ∇x f(θ−εv, x)] / (2ε)``, ``ε = epsilon/‖v‖``.

    Args:
        lower: the lower problem (``params`` = ``θ``, ``inputs`` = ``x``).
        v: cotangent on ``lower.params``, one tensor per parameter.
        epsilon: perturbation size relative to ``‖v‖`` (DARTS uses 0.01).
        scale_by_lr: multiply by ``lower.lr`` (``H⁻¹ ≈ η·I``, as in DARTS's
            unrolled one-step approximation; ``diag(η_i I)`` for per-tensor
            rates); otherwise ``H⁻¹ ≈ I``.
        create_graph: keep the graph of the result (differentiable w.r.t.
            ``params``, ``inputs`` and ``v``).

    Returns:
        One tensor per ``lower.inputs``; detached unless ``create_graph``.
    """
    _check(epsilon=epsilon, scale_by_lr=scale_by_lr, create_graph=create_graph)
    v = tuple(v)
    if len(v) != len(lower.params):
        raise ValueError(f"v has {len(v)} tensors, lower.params has {len(lower.params)}")
    scale = 1.0
    if scale_by_lr and isinstance(lower.lr, (int, float)):
        scale = lower.lr
    elif scale_by_lr:                      # H⁻¹ ≈ diag(η_i I): scale v tensor by tensor
        if len(lower.lr) != len(v):
            raise ValueError(f"lower.lr has {len(lower.lr)} rates, lower.params has {len(v)} tensors")
        v = tuple(eta * t for eta, t in zip(lower.lr, v))
    return central_difference(lower, v, epsilon, scale, create_graph, method="finite_difference",
                              option="epsilon", symbol="v", advice="(DARTS: 0.01)")


def central_difference(lower: Lower, v: Sequence[Tensor], epsilon: float, scale: float,
                       create_graph: bool, *, method: str, option: str, symbol: str,
                       advice: str) -> Tensors:
    """``−scale·[∇x f(θ+εv, x) − ∇x f(θ−εv, x)] / (2ε)`` with ``ε = epsilon/‖v‖`` — the
    central difference behind ``finite_difference`` and ``sama`` (which differ in ``v``).

    ``method``, ``option``, ``symbol`` and ``advice`` word the warning given when the
    perturbation rounds away (``"{method}: {option}=… is too small: θ ± ε{symbol} …"``),
    and the one given when it is below what bfloat16/float16 resolves (the variables'
    dtype or ``lower.compute_dtype``: ``epsilon/‖θ‖`` under that format's relative spacing,
    module docstring), once per ``(lower.label, method, epsilon)``.
    Returns one tensor per ``lower.inputs``; detached unless ``create_graph``.
    """
    v = tuple(v)
    # One host synchronisation: ‖v‖ (its sum of squares in v's dtype, as it always was:
    # ε = epsilon/‖v‖ sets the rounding of every difference below) and θ's tensor norms.
    # (of detached tensors: no graph, no grad-mode switch needed)
    ns = [torch.sqrt(sum(torch.sum(t.detach() ** 2) for t in v))] + \
         [torch.linalg.vector_norm(p.detach()) for p in lower.params]
    if len({n.dtype for n in ns}) > 1:
        ns = [n.double() for n in ns]
    flat = torch.stack(ns).tolist()
    norm = flat[0]
    pnorm = math.sqrt(math.fsum(x * x for x in flat[1:]))               # ≥ max|θ_i|
    numel = sum(t.numel() for t in v)
    if norm == 0.0:
        return zeros_like_all(lower.inputs)
    eps = epsilon / norm

    if create_graph:
        params, vs = tuple(lower.params), v
        inputs = tuple(x if x.requires_grad else x.detach().requires_grad_() for x in lower.inputs)
    else:
        params = tuple(p.detach() for p in lower.params)
        vs = detach_all(v)
        inputs = tuple(x.detach().requires_grad_() for x in lower.inputs)

    plus = tuple(p + eps * t for p, t in zip(params, vs))    # new tensors: θ + εv
    minus = tuple(p - eps * t for p, t in zip(params, vs))   # new tensors: θ − εv
    # Did the perturbation survive rounding? Surely, when the largest step ε·max|v_i| is
    # above the spacing of the largest |θ_i| (no extra synchronisation); otherwise check.
    # ε·max|v_i| ≥ epsilon/√n; it moves the largest |θ_i| ≤ ‖θ‖ when above twice its spacing.
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    finfos = [torch.finfo(d) for d in dtypes]
    surely = bool(finfos) and math.isfinite(pnorm) and epsilon / math.sqrt(max(numel, 1)) > \
        2 * max(f.eps for f in finfos) * max(pnorm, max(f.tiny for f in finfos))
    if not surely:
        with torch.no_grad():
            surely = bool(torch.stack([((a != p) | (b != p)).any() for a, b, p in zip(plus, minus, params)]).any())
    if not surely:
        warnings.warn(f"{lower.label + ': ' if lower.label else ''}{method}: {option}={epsilon!r} "
                      f"is too small: θ ± ε{symbol} rounds to θ (ε = {option}/‖{symbol}‖ = {eps:.3g}), "
                      f"so this hypergradient is exactly 0; use a larger {option} {advice}",
                      RuntimeWarning, stacklevel=3)
    else:
        _warn_precision(lower, dtypes, epsilon, pnorm, method=method, option=option, symbol=symbol)
    # ∇x f(θ+εv) − ∇x f(θ−εv) = ∇x [f(θ+εv) − f(θ−εv)]: two forwards, one backward.
    diff = _grad_inputs(lower, plus, inputs, create_graph, minus=minus)

    out = tuple(None if d is None else -scale * d / (2.0 * eps) for d in diff)
    return out if create_graph else detach_all(out)
