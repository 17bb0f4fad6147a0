"""Matrix-free linear solvers on tuples of tensors.

Every solver has the signature of jaxopt's ``linear_solve`` functions::

    x = solve(matvec, b, **settings)

where ``matvec(u) -> H u`` maps a tuple of tensors to a tuple of tensors of the
same shapes (a Hessian-vector product, typically) and ``b`` is such a tuple.
They approximate ``x = H⁻¹ b``. Solvers never detach: when ``matvec`` and ``b``
carry an autograd graph the result is differentiable through the iterations.

Bind the settings once with :func:`get` (``get("cg", max_iter=20)``) and pass
the resulting one-argument-pair function around.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["neumann", "cg", "dense", "register", "get", "available", "Solver"]

Tensors = Tuple[Tensor, ...]
MatVec = Callable[[Tensors], Tensors]
Solver = Callable[..., Tensors]


# --- tuple arithmetic ---------------------------------------------------------

def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    terms = [torch.sum(x * y) for x, y in zip(a, b)]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _axpy(alpha, x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensors:
    """``alpha * x + y`` elementwise over the tuple: one fused ``y.add(x, alpha=)`` per
    tensor for a number (``x + y`` for 1), a product and a sum for a tensor ``alpha``."""
    if isinstance(alpha, (int, float)):
        if alpha == 1:
            return tuple(xi + yi for xi, yi in zip(x, y))
        return tuple(yi.add(xi, alpha=alpha) for xi, yi in zip(x, y))
    return tuple(alpha * xi + yi for xi, yi in zip(x, y))


def _scale(alpha, x: Sequence[Tensor]) -> Tensors:
    """``alpha * x`` (``x`` itself for 1: the solvers never write into their vectors)."""
    if isinstance(alpha, (int, float)) and alpha == 1:
        return tuple(x)
    return tuple(alpha * xi for xi in x)


# --- solvers ------------------------------------------------------------------

def neumann(matvec: MatVec, b: Sequence[Tensor], *, iterations: int = 10,
            alpha: float = 1.0, info: Optional[Dict[str, Tensor]] = None) -> Tensors:
    """Truncated Neumann series for ``H⁻¹ b``.

    .. math::  p_K = \\sum_{k=0}^{K} (I - αH)^k \\, α b = H⁻¹ (I - (I - αH)^{K+1}) b

    ``iterations = K`` Hessian-vector products give ``K + 1`` terms (``K = 0``
    returns ``α b``). The series converges to ``H⁻¹ b`` iff the spectral radius
    of ``I − αH`` is below 1 (``0 < α < 2 / λ_max(H)`` for positive definite
    ``H``); the truncated sum above is what is returned for every ``α``.

    Args:
        matvec: ``u ↦ H u``.
        b: right-hand side.
        iterations: ``K``, number of matrix-vector products.
        alpha: step ``α`` of the underlying Richardson iteration.
        info: a dict to fill, or ``None``: ``info["term_norms"]`` is then a detached
            tensor ``[‖α b‖, ‖(I − αH)^K α b‖]`` (the first and the last term; left on
            the device — reading it is the caller's one host synchronisation).
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    term = _scale(alpha, b)  # (I - αH)^0 α b
    first = term
    p = term
    for _ in range(iterations):
        term = _axpy(-alpha, matvec(term), term)  # (I - αH) term
        p = _axpy(1.0, term, p)
    if info is not None:
        info["term_norms"] = torch.stack([_norm(first), _norm(term)])
    return p


def _norm(x: Sequence[Tensor]) -> Tensor:
    """``‖x‖`` over the tuple, detached (a diagnostic, never differentiated)."""
    x = [t.detach() for t in x]
    return torch.sqrt(_dot(x, x)) if x else torch.zeros(())


def _value(t: Tensor) -> float:
    return float(t.detach() if t.requires_grad else t)


def cg(matvec: MatVec, b: Sequence[Tensor], *, max_iter: Optional[int] = None,
       tol: float = 1e-10, damping: float = 0.0, info: Optional[Dict[str, float]] = None) -> Tensors:
    """Conjugate gradient for ``(H + δ I) x = b``.

    ``H + δI`` must be symmetric positive definite; the damping ``δ`` makes
    that true for non-convex lowers whose Hessian has eigenvalues above ``−δ``.
    Starts at ``x₀ = 0`` and stops when ``‖r‖ ≤ tol · ‖b‖`` or after
    ``max_iter`` iterations (default: the number of unknowns, where exact
    arithmetic would terminate).

    Args:
        matvec: ``u ↦ H u``.
        b: right-hand side.
        max_iter: maximum number of matrix-vector products.
        tol: relative residual tolerance.
        damping: ``δ ≥ 0`` added to the diagonal.
        info: a dict to fill, or ``None``: ``info["iterations"]`` (matrix-vector
            products taken), ``info["residual"]`` (the final relative residual
            ``‖r‖/‖b‖`` of the recurrence, a float; ``nan`` when the iteration broke
            down) and ``info["converged"]`` (``‖r‖ ≤ tol·‖b‖``). The stopping test
            reads ``‖r‖²`` on the host every iteration anyway; filling ``info`` adds
            no synchronisation but the one after the last iteration.
    """
    b = tuple(b)
    if max_iter is None:
        max_iter = sum(t.numel() for t in b)

    def op(u):
        hu = matvec(u)
        return _axpy(damping, u, hu) if damping else tuple(hu)

    x = tuple(torch.zeros_like(t) for t in b)
    r = b
    p = r
    rs = _dot(r, r)
    rs_value = _value(rs)                  # one host read per iteration: the stopping test's
    rs0 = rs_value
    threshold = (tol ** 2) * rs_value
    if rs_value == 0.0:
        _cg_info(info, 0, 0.0, True)
        return x
    done = 0
    for i in range(max_iter):
        if i:
            rs_value = _value(rs)
        if rs_value <= threshold:
            break
        hp = op(p)
        step = rs / _dot(p, hp)
        x = _axpy(step, p, x)
        r = tuple(ri - step * hi for ri, hi in zip(r, hp))     # (= −step·hp + r, one op less)
        rs_new = _dot(r, r)
        done = i + 1
        if done < max_iter:                # (the last iteration's new direction is never used)
            p = _axpy(rs_new / rs, p, r)
        rs = rs_new
    if info is not None:
        if done == max_iter:               # the last iteration's residual was never read
            rs_value = _value(rs)
        _cg_info(info, done, (rs_value / rs0) ** 0.5 if rs_value >= 0 else math.nan,
                 rs_value <= threshold)
    return x


def _cg_info(info: Optional[Dict[str, float]], iterations: int, residual: float, converged: bool) -> None:
    if info is not None:
        info.update(iterations=iterations, residual=residual, converged=bool(converged))


def dense(matvec: MatVec, b: Sequence[Tensor], *, damping: float = 0.0) -> Tensors:
    """Exact ``(H + δI)⁻¹ b`` by materialising ``H`` one column at a time.

    ``n`` matrix-vector products and an ``O(n³)`` solve for ``n`` unknowns:
    a reference for small problems and tests, not for training.
    """
    b = tuple(b)
    shapes = [t.shape for t in b]
    sizes = [t.numel() for t in b]
    n = sum(sizes)
    flat_b = torch.cat([t.reshape(-1) for t in b])

    def unflatten(flat: Tensor) -> Tensors:
        return tuple(c.reshape(s) for c, s in zip(torch.split(flat, sizes), shapes))

    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
    cols = [torch.cat([t.reshape(-1) for t in matvec(unflatten(eye[:, i]))]) for i in range(n)]
    h = torch.stack(cols, dim=1)
    if damping:
        h = h + damping * eye
    return unflatten(torch.linalg.solve(h, flat_b))


# --- registry -----------------------------------------------------------------

_SOLVERS: Dict[str, Solver] = {}


def register(name: str, fn: Solver) -> Solver:
    """Registers linear solver ``fn(matvec, b, **settings)`` as ``name``."""
    if name in _SOLVERS:
        raise ValueError(f"linear solver {name!r} is already registered")
    _SOLVERS[name] = fn
    return fn


def get(name: str, **settings) -> Callable[[MatVec, Sequence[Tensor]], Tensors]:
    """Returns solver ``name`` with ``settings`` bound: ``solve(matvec, b)``."""
    try:
        fn = _SOLVERS[name]
    except KeyError:
        raise KeyError(f"unknown linear solver {name!r}; available: {sorted(_SOLVERS)}") from None
    return functools.partial(fn, **settings) if settings else fn


def available() -> Tuple[str, ...]:
    """Names of all registered linear solvers."""
    return tuple(sorted(_SOLVERS))


register("neumann", neumann)
register("cg", cg)
register("dense", dense)
