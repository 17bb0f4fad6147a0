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

import math
import numbers
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import solvers
from .base import (Lower, check_bool, check_int, check_number, detach_all, fill_unreached, grad_mode,
                   no_inputs_reached, register)

__all__ = ["implicit", "neumann", "cg", "CG_MAX_ITER", "CG_TOL", "CG_RESOLVED_LOW"]

Tensors = Tuple[Tensor, ...]

#: CG's default iteration bound: Hessian-vector products per solve (docs/methods.md#diagnostics).
CG_MAX_ITER = 50
#: CG's default relative residual tolerance ``‖r‖/‖v‖``.
CG_TOL = 1e-10
#: Below float64, a final residual at most this counts as converged for the warning: CG's
#: recurrence goes on shrinking after the true residual has stalled at float32's rounding
#: level, so a smaller ``tol`` cannot be confirmed there (docs/methods.md#diagnostics).
CG_RESOLVED_LOW = 1e-6

_WARNED: set = set()     # (label, method, options) already warned about, once each in a process


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


def _check_cg(*, max_iter: Optional[int] = CG_MAX_ITER, tol: float = CG_TOL, damping: float = 0.0,
              create_graph: bool = False) -> None:
    check_int("cg", "max_iter", max_iter, low=1, none=True)
    check_number("cg", "tol", tol, open_low=False)
    check_number("cg", "damping", damping, open_low=False)
    check_bool("cg", "create_graph", create_graph)


def _warn_once(lower: Lower, key: tuple, message: str) -> None:
    """A ``RuntimeWarning`` naming ``lower``, once per ``(lower.label, *key)`` in a process."""
    key = (lower.label,) + key
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"{lower.label + ': ' if lower.label else ''}{message}", RuntimeWarning, stacklevel=3)


#: Neumann's growth check reads two norms on the host, and CG's report of a solve that
#: stopped at max_iter its final residual: each runs on a problem's first
#: CHECK_FIRST solves and on every CHECK_EVERY-th after (keyed like
#: the warnings), not on every solve of a long run.
CHECK_FIRST, CHECK_EVERY = 10, 100
_SOLVES: Dict[tuple, int] = {}


def _check_due(lower: Lower, key: tuple) -> bool:
    """Whether this solve of ``lower`` (with options ``key``) runs its host-side check:
    by ``lower.solve_index`` when the caller gives it, else counted per label."""
    n = lower.solve_index
    if n is None:
        key = (lower.label,) + key
        n = _SOLVES.get(key, 0)
        _SOLVES[key] = n + 1
    return n < CHECK_FIRST or n % CHECK_EVERY == 0


def _note(lower: Lower, **values: Any) -> None:
    """Fills ``lower.diagnostics`` (when the caller asked for them)."""
    if lower.diagnostics is not None:
        lower.diagnostics.update(values)


@register("neumann", check=_check_neumann)
def neumann(lower: Lower, v: Sequence[Tensor], *, iterations: int = 10,
            alpha: float = 1.0, create_graph: bool = False) -> Tensors:
    """IFT with ``H⁻¹ v ≈ Σ_{k=0}^{K} (I − αH)^k α v`` (``K = iterations``).

    See :func:`engines.solvers.neumann`; converges when ``0 < α < 2/λ_max(H)``.
    Reports ``neumann_last_term = ‖(I − αH)^K α v‖ / ‖α v‖`` in ``lower.diagnostics``
    and warns (once per problem and options) when it exceeds 1: the series grows.
    The check costs one host synchronisation (the two norms, read together); it runs on
    a problem's first ``CHECK_FIRST`` solves and every ``CHECK_EVERY``-th
    after, so the record is that of the last checked solve.
    """
    _check_neumann(iterations=iterations, alpha=alpha, create_graph=create_graph)
    info: Optional[Dict[str, Tensor]] = {} if _check_due(lower, ("neumann", iterations, alpha)) else None
    solve = solvers.get("neumann", iterations=iterations, alpha=alpha, info=info)
    out = implicit(lower, v, solve, create_graph=create_graph)
    if info is not None and "term_norms" in info:     # (absent: nothing solved, or not due)
        first, last = info["term_norms"].tolist()
        ratio = last / first if first > 0 else (0.0 if last == 0 else math.inf)
        _note(lower, neumann_last_term=ratio)
        if not ratio <= 1.0:
            _warn_once(lower, ("neumann", iterations, alpha), _neumann_message(ratio, iterations, alpha))
    return out


def _neumann_message(ratio: float, iterations: int, alpha: float) -> str:
    """What a growing Neumann series means and what to change."""
    if math.isnan(ratio):
        return (f"neumann: the series' terms are not finite (iterations={iterations}, alpha={alpha:g}): "
                f"a Hessian-vector product or v holds NaN/inf, or the series overflowed; it converges "
                f"only for 0 < alpha < 2/λ_max(H) — choose a smaller alpha if the loss is finite")
    msg = (f"neumann: the series grows: its last term (k={iterations}) has {ratio:.3g} × the norm "
           f"of the first (iterations={iterations}, alpha={alpha:g}), so the hypergradient is "
           f"dominated by a diverging sum. The series converges only for 0 < alpha < 2/λ_max(H)")
    if math.isfinite(ratio) and iterations > 0:
        # |1 − αλ| ≈ ratio^(1/K) for the dominant eigenvalue; λ > 2/α when it grows.
        lam = (1.0 + ratio ** (1.0 / iterations)) / alpha
        msg += (f"; the growth suggests λ_max(H) ≈ {lam:.3g}: use alpha below {2.0 / lam:.3g} "
                f"(e.g. {1.0 / lam:.2g})")
    return msg + (", or cg with damping if the lower's Hessian has negative eigenvalues "
                  "(no alpha makes the series converge then)")


@register("cg", check=_check_cg)
def cg(lower: Lower, v: Sequence[Tensor], *, max_iter: Optional[int] = CG_MAX_ITER,
       tol: float = CG_TOL, damping: float = 0.0, create_graph: bool = False) -> Tensors:
    """IFT with ``H⁻¹ v ≈ (H + δI)⁻¹ v`` by conjugate gradient (``δ = damping``).

    See :func:`engines.solvers.cg`: at most ``max_iter`` Hessian-vector products
    (default :data:`CG_MAX_ITER`; ``None``: the number of lower parameters, where exact
    arithmetic terminates), stopping early when the relative residual ``‖r‖/‖v‖`` is
    at most ``tol``. Reports ``cg_iterations`` and ``cg_residual`` (the final relative
    residual) in ``lower.diagnostics``, and warns — once per problem and options — when
    it stops at ``max_iter`` above ``tol`` (not for ``tol=0``, which asks for exactly
    ``max_iter`` iterations; nor, when ``v`` is not float64, at a residual at most
    :data:`CG_RESOLVED_LOW`, below which float32 cannot confirm the solve). No host
    synchronisation beyond the stopping test's, which reads the residual every iteration
    anyway, and the final residual's read when CG stops at ``max_iter``; like Neumann's
    check, that report runs on a problem's first ``CHECK_FIRST`` solves and every
    ``CHECK_EVERY``-th after (the record is that of the last reported solve).
    """
    _check_cg(max_iter=max_iter, tol=tol, damping=damping, create_graph=create_graph)
    v = tuple(v)
    info: Optional[Dict[str, Any]] = {} if _check_due(lower, ("cg", max_iter, tol, damping)) else None
    solve = solvers.get("cg", max_iter=max_iter, tol=tol, damping=damping, info=info)
    out = implicit(lower, v, solve, create_graph=create_graph)
    if info:                     # (empty: nothing solved, or None: not due)
        _note(lower, cg_iterations=info["iterations"], cg_residual=info["residual"])
        resolved = 0.0 if all(t.dtype == torch.float64 for t in v) else CG_RESOLVED_LOW
        if not info["converged"] and tol > 0 and not info["residual"] <= resolved:
            _warn_once(lower, ("cg", max_iter, tol, damping),
                       _cg_message(info["iterations"], info["residual"], max_iter, tol, damping))
    return out


def _cg_message(iterations: int, residual: float, max_iter: Optional[int], tol: float,
                damping: float) -> str:
    """What an unconverged CG solve means and what to change."""
    if not math.isfinite(residual):
        return (f"cg broke down after {iterations} iterations (max_iter={max_iter}, tol={tol:g}, "
                f"damping={damping:g}): the relative residual is {residual}, so the hypergradient "
                f"is not usable. Either a Hessian-vector product or v is not finite, or pᵀ(H + δI)p "
                f"reached 0 (a singular or indefinite Hessian): add damping, δ > −λ_min(H)")
    return (f"cg stopped unconverged after {iterations} iterations (max_iter={max_iter}): relative "
            f"residual ‖r‖/‖v‖ = {residual:.3g} > tol = {tol:g} (damping={damping:g}), so the "
            f"hypergradient comes from a truncated solve. Raise max_iter, add damping (CG needs "
            f"H + δI positive definite: δ > −λ_min(H) for a non-convex lower; a larger δ also "
            f"speeds up an ill-conditioned one), or loosen tol; tol=0.0 runs exactly max_iter "
            f"iterations without this warning")
