"""Implicit-function-theorem hypergradients (Neumann series, conjugate gradient).

At a stationary point ``∇θ f(θ*, x) = 0`` of the lower loss, the implicit
function theorem gives the best-response Jacobian, hence::

    (dθ*/dx)ᵀ v = −∂²_{xθ} f · H⁻¹ v,        H = ∂²_{θθ} f(θ, x)

evaluated at the current lower iterate ``θ = lower.params``. ``H⁻¹ v`` is a
matrix-free linear solve (:mod:`engines.solvers`) whose matrix-vector products
are Hessian-vector products by double backward; the mixed term
``∂²_{xθ} f · u = ∇x ⟨∇θ f, u⟩`` is one more backward. ``∇θ f`` is computed
once with ``create_graph=True`` and reused by every product.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

import math
import numbers

from . import solvers
from .base import (Lower, check_bool, check_int, check_number, detach_all, fill_unreached, grad_mode,
                   no_inputs_reached, register)

__all__ = ["implicit", "neumann", "cg"]

Tensors = Tuple[Tensor, ...]


def _as_grad_leaves(ts: Sequence[Tensor]) -> Tensors:
    """Tensors that require grad (a detached leaf copy stands in for one that doesn't)."""
    return tuple(t if t.requires_grad else t.detach().requires_grad_() for t in ts)


def _fill(grads, like: Sequence[Tensor]) -> Tensors:
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like))


def implicit(lower: Lower, v: Sequence[Tensor],
             solve: Callable[[Callable, Tensors], Tensors] = solvers.dense,
             *, create_graph: bool = False) -> Tensors:
    """``(dθ*/dx)ᵀ v = −∂²_{xθ} f · H⁻¹ v`` with a given linear solver.

    Args:
        lower: the lower problem; ``params`` should be (near) a stationary point.
        v: cotangent on ``lower.params``, one tensor per parameter.
        solve: ``solve(matvec, b) -> x ≈ H⁻¹ b`` (see :mod:`engines.solvers`);
            the default materialises ``H`` — a reference for small problems.
        create_graph: keep the graph of the result (differentiable w.r.t.
            ``params``, ``inputs`` and ``v``) for higher-order use.

    Returns:
        One tensor per ``lower.inputs`` (zeros — ``None`` under
        ``lower.unused_as_none`` — for inputs ``f`` does not couple to ``θ``);
        detached unless ``create_graph``.
    """
    params = _as_grad_leaves(lower.params)
    inputs = _as_grad_leaves(lower.inputs)
    v = tuple(v) if create_graph else detach_all(v)
    if len(v) != len(params):
        raise ValueError(f"v has {len(v)} tensors, lower.params has {len(params)}")

    with grad_mode(True):
        loss = lower.loss_fn(params, inputs)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [g is not None and g.requires_grad for g in grads]
        if not any(live):  # ∇θ f independent of θ and x: no coupling
            return no_inputs_reached(lower)
        g_live = tuple(g for g, ok in zip(grads, live) if ok)

        def hvp(u: Tensors) -> Tensors:
            u_live = tuple(ui for ui, ok in zip(u, live) if ok)
            hu = torch.autograd.grad(g_live, params, u_live, retain_graph=True,
                                     create_graph=create_graph, allow_unused=True)
            return _fill(hu, params)

        u = tuple(solve(hvp, v))
        u_live = tuple(ui for ui, ok in zip(u, live) if ok)
        mixed = torch.autograd.grad(g_live, inputs, u_live, retain_graph=create_graph,
                                    create_graph=create_graph, allow_unused=True)
    out = tuple(None if m is None else -m for m in fill_unreached(lower, mixed))
    return out if create_graph else detach_all(out)


def _check_neumann(*, iterations: int = 10, alpha: float = 1.0, create_graph: bool = False) -> None:
    check_int("neumann", "iterations", iterations, low=0)
    if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and math.isfinite(alpha)
            and alpha > 0):
        raise ValueError(f"neumann: alpha must be a number > 0 (finite; the series converges "
                         f"for 0 < alpha < 2/λ_max(H)), got {alpha!r}")
    check_bool("neumann", "create_graph", create_graph)


def _check_cg(*, max_iter: Optional[int] = None, tol: float = 1e-10, damping: float = 0.0,
              create_graph: bool = False) -> None:
    check_int("cg", "max_iter", max_iter, low=1, none=True)
    check_number("cg", "tol", tol, open_low=False)
    check_number("cg", "damping", damping, open_low=False)
    check_bool("cg", "create_graph", create_graph)


@register("neumann", check=_check_neumann)
def neumann(lower: Lower, v: Sequence[Tensor], *, iterations: int = 10,
            alpha: float = 1.0, create_graph: bool = False) -> Tensors:
    """IFT with ``H⁻¹ v ≈ Σ_{k=0}^{K} (I − αH)^k α v`` (``K = iterations``).

    See :func:`engines.solvers.neumann`; converges when ``0 < α < 2/λ_max(H)``.
    """
    _check_neumann(iterations=iterations, alpha=alpha, create_graph=create_graph)
    solve = solvers.get("neumann", iterations=iterations, alpha=alpha)
    return implicit(lower, v, solve, create_graph=create_graph)


@register("cg", check=_check_cg)
def cg(lower: Lower, v: Sequence[Tensor], *, max_iter: Optional[int] = None,
       tol: float = 1e-10, damping: float = 0.0, create_graph: bool = False) -> Tensors:
    """IFT with ``H⁻¹ v ≈ (H + δI)⁻¹ v`` by conjugate gradient (``δ = damping``).

    See :func:`engines.solvers.cg`; ``max_iter`` defaults to the number of
    lower parameters, ``tol`` is a relative residual tolerance.
    """
    _check_cg(max_iter=max_iter, tol=tol, damping=damping, create_graph=create_graph)
    solve = solvers.get("cg", max_iter=max_iter, tol=tol, damping=damping)
    return implicit(lower, v, solve, create_graph=create_graph)
