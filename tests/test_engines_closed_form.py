"""Every hypergradient engine against closed forms on P1 (ridge, per-feature decay).

Lower ``f(w, λ) = ½‖Xw − y‖² + ½ Σ_j λ_j w_j²``, ``H = XᵀX + diag(λ)``,
``w* = H⁻¹Xᵀy``; upper ``F = ½‖X_v w − y_v‖²``, ``g = X_vᵀ(X_v w* − y_v)``.
``∂²_{λw} f · u = w ⊙ u``, so the implicit hypergradient is
``∂F/∂λ = −w* ⊙ H⁻¹g`` (the direct term ``∂F/∂λ`` is zero). float64 throughout.
"""
from __future__ import annotations

import pytest
import torch

from engines import solvers
from engines.base import Lower, get
from engines.implicit import implicit

DT = torch.float64
D = 6  # features


def ridge(seed: int = 0, x_norm: float = 1.0, lam_range=(0.2, 0.9), n: int = 15, d: int = D):
    """P1 with ``‖XᵀX‖₂ = x_norm`` and λ uniform in ``lam_range`` (distinct per feature)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    X = X * (x_norm / torch.linalg.matrix_norm(X.T @ X, ord=2)) ** 0.5
    y = torch.randn(n, generator=gen, dtype=DT)
    Xv = torch.randn(n, d, generator=gen, dtype=DT)
    yv = torch.randn(n, generator=gen, dtype=DT)
    lo, hi = lam_range
    lam = lo + (hi - lo) * torch.rand(d, generator=gen, dtype=DT)
    H = X.T @ X + torch.diag(lam)
    w_star = torch.linalg.solve(H, X.T @ y)
    g = Xv.T @ (Xv @ w_star - yv)
    exact = -w_star * torch.linalg.solve(H, g)
    return dict(X=X, y=y, Xv=Xv, yv=yv, lam=lam, H=H, w_star=w_star, g=g, exact=exact)


def loss_fn(P):
    X, y = P["X"], P["y"]

    def f(params, inputs):
        (w,), (lam,) = params, inputs
        return 0.5 * torch.sum((X @ w - y) ** 2) + 0.5 * torch.sum(lam * w ** 2)

    return f


def lower_at_optimum(P) -> Lower:
    w = P["w_star"].clone().requires_grad_()
    lam = P["lam"].clone().requires_grad_()
    return Lower(params=(w,), inputs=(lam,), loss_fn=loss_fn(P))


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# --- linear solvers on their own ---------------------------------------------

def test_solvers_on_tuples_match_dense(measured):
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(7, 7, generator=gen, dtype=DT)
    H = A @ A.T / 7 + 0.3 * torch.eye(7, dtype=DT)
    b = torch.randn(7, generator=gen, dtype=DT)
    # the unknown split over two tensors of different shapes
    def mv(u):
        hu = H @ torch.cat([u[0].reshape(-1), u[1]])
        return hu[:4].reshape(2, 2), hu[4:]

    bt = (b[:4].reshape(2, 2), b[4:])
    ref = torch.linalg.solve(H, b)
    for x in (solvers.dense(mv, bt), solvers.cg(mv, bt, tol=1e-14),
              solvers.get("cg", max_iter=7, tol=0.0)(mv, bt)):
        assert x[0].shape == (2, 2) and x[1].shape == (3,)
        measured("solvers dense/CG on tuples vs torch.linalg.solve",
                 rel(torch.cat([x[0].reshape(-1), x[1]]), ref), 1e-10)
    # Neumann: K iterations = K+1 terms of the series, for an α ≠ 1
    alpha, K = 0.4, 3
    M = torch.eye(7, dtype=DT) - alpha * H
    expect = sum(torch.linalg.matrix_power(M, k) @ (alpha * b) for k in range(K + 1))
    x = solvers.neumann(mv, bt, iterations=K, alpha=alpha)
    measured("solvers Neumann (K=3, α=0.4) on tuples vs explicit series",
             rel(torch.cat([x[0].reshape(-1), x[1]]), expect), 1e-13)
    with pytest.raises(KeyError, match="available"):
        solvers.get("lu")


# --- implicit: CG ---------------------------------------------------------------

def test_cg_matches_closed_form(measured):
    P = ridge(seed=1)
    lower = lower_at_optimum(P)
    (out,) = get("cg")(lower, (P["g"],), max_iter=D, tol=0.0)
    measured("P1 implicit CG (d iterations) vs closed form", rel(out, P["exact"]), 1e-8)
    # d − 2 iterations are visibly short of the answer: the check can fail
    (short,) = get("cg")(lower, (P["g"],), max_iter=D - 2, tol=0.0)
    assert rel(short, P["exact"]) > 1e-6
    # the generic reference path (dense solve) agrees too
    (ref,) = implicit(lower, (P["g"],))
    measured("P1 implicit dense solve vs closed form", rel(ref, P["exact"]), 1e-12)


@pytest.mark.parametrize("damping", [0.5, 3.0])
def test_cg_damping_solves_damped_system(damping, measured):
    P = ridge(seed=2)
    lower = lower_at_optimum(P)
    (out,) = get("cg")(lower, (P["g"],), tol=1e-14, damping=damping)
    Hd = P["H"] + damping * torch.eye(D, dtype=DT)
    expect = -P["w_star"] * torch.linalg.solve(Hd, P["g"])
    measured("P1 CG with damping vs (H+δI)⁻¹ closed form", rel(out, expect), 1e-10)
    assert rel(out, P["exact"]) > 1e-3  # damping really changes the answer
    (dense_out,) = implicit(lower, (P["g"],), solvers.get("dense", damping=damping))
    measured("P1 dense solve with damping vs (H+δI)⁻¹ closed form", rel(dense_out, expect), 1e-12)


def test_cg_damping_handles_indefinite_hessian(measured):
    # λ with negative entries: H indefinite, H + δI positive definite
    P = ridge(seed=4, lam_range=(-0.4, 0.5))
    H = P["H"]
    assert torch.linalg.eigvalsh(H).min() < 0
    damping = 1.0 - float(torch.linalg.eigvalsh(H).min())
    lower = lower_at_optimum(P)
    (out,) = get("cg")(lower, (P["g"],), tol=1e-14, damping=damping)
    expect = -P["w_star"] * torch.linalg.solve(H + damping * torch.eye(D, dtype=DT), P["g"])
    measured("P1 CG damping on indefinite H vs closed form", rel(out, expect), 1e-10)


# --- implicit: Neumann ---------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.1, 0.45, 1.0, 1.5])
@pytest.mark.parametrize("K", [1, 5, 20])
def test_neumann_error_is_exact_truncation_term(alpha, K, measured):
    """One H for every α (eigenvalues 0.35…1.27), so ρ(I − αH) = 0.96, 0.84, 0.65, 0.91:
    every (α, K) leaves a truncation term of 1e-5…0.9 relative to the answer."""
    P = ridge(seed=5, x_norm=1.0, lam_range=(0.2, 0.3))
    H, g = P["H"], P["g"]
    I = torch.eye(D, dtype=DT)
    assert torch.linalg.matrix_norm(I - alpha * H, ord=2) < 1
    lower = lower_at_optimum(P)
    (out,) = get("neumann")(lower, (g,), iterations=K, alpha=alpha)

    def truncation(a):
        # p_K − H⁻¹g = −H⁻¹ (I − aH)^{K+1} g  ⇒  error = −w* ⊙ (p_K − H⁻¹g)
        return P["w_star"] * torch.linalg.solve(H, torch.linalg.matrix_power(I - a * H, K + 1) @ g)

    norm = torch.linalg.vector_norm(P["exact"])
    err = float(torch.linalg.vector_norm((out - P["exact"]) - truncation(alpha)) / norm)
    measured("P1 Neumann error − its exact truncation term (I−αH)^{K+1}", err, 1e-10)
    # the term is not negligible, and it is specific to α (5% off is visible)
    assert float(torch.linalg.vector_norm(truncation(alpha)) / norm) > 1e-5
    assert float(torch.linalg.vector_norm((out - P["exact"]) - truncation(1.05 * alpha)) / norm) > 1e-8


# --- finite difference (DARTS) ---------------------------------------------------

@pytest.mark.parametrize("scale_by_lr", [False, True])
@pytest.mark.parametrize("name", ["finite_difference", "darts"])
def test_finite_difference_is_identity_hessian_formula(name, scale_by_lr, measured):
    P = ridge(seed=6)
    lower = lower_at_optimum(P)
    lower.lr = 0.3
    (w,) = lower.params
    before = w.detach().clone()
    ptr, version = w.data_ptr(), w._version
    (out,) = get(name)(lower, (P["g"],), scale_by_lr=scale_by_lr, epsilon=0.003)
    expect = -(0.3 if scale_by_lr else 1.0) * P["w_star"] * P["g"]
    measured("P1 finite difference vs identity-Hessian formula −s·w⊙g", rel(out, expect), 1e-6)
    assert torch.equal(w.detach(), before)
    assert w.data_ptr() == ptr and w._version == version
    assert w.grad is None and lower.inputs[0].grad is None


# --- unrolled --------------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 2, 10])
def test_unrolled_matches_k_step_recursion(K, measured):
    P = ridge(seed=7)
    H, lam = P["H"], P["lam"]
    eta = 0.5
    f = loss_fn(P)
    lam_t = lam.clone().requires_grad_()
    w0 = torch.randn(D, generator=torch.Generator().manual_seed(8), dtype=DT)
    # the unroll, with graph from λ
    w = w0.clone().requires_grad_()
    traj = [w0]
    for _ in range(K):
        (gw,) = torch.autograd.grad(f((w,), (lam_t,)), (w,), create_graph=True)
        w = w - eta * gw
        traj.append(w.detach())
    gK = P["Xv"].T @ (P["Xv"] @ w.detach() - P["yv"])
    lower = Lower(params=(w.detach().requires_grad_(),), inputs=(lam_t,),
                  loss_fn=f, outputs=(w,), lr=eta)
    (out,) = get("unrolled")(lower, (gK,))
    # closed form: s_{k+1} = (I − ηH) s_k − η diag(w_k), s_0 = 0
    M = torch.eye(D, dtype=DT) - eta * H
    s = torch.zeros(D, D, dtype=DT)
    for k in range(K):
        s = M @ s - eta * torch.diag(traj[k])
    expect = s.T @ gK
    measured("P1 unrolled (engines, K∈{1,2,10}) vs s_Kᵀg recursion", rel(out, expect), 1e-10)
    assert not out.requires_grad
    # retain_graph: a second cotangent through the same unroll works
    get("unrolled")(lower, (torch.ones(D, dtype=DT),))
    (fo,) = get("unrolled")(lower, (gK,), first_order=True)
    assert torch.equal(fo, torch.zeros(D, dtype=DT))


def test_unrolled_without_outputs_is_a_clear_error():
    P = ridge(seed=9)
    with pytest.raises(ValueError, match="outputs"):
        get("unrolled")(lower_at_optimum(P), (P["g"],))
