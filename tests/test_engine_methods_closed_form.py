"""P1 ridge through ``mlo.Engine`` with every hypergradient method (float64).

Lower ``f(w, λ) = ½‖Xw − y‖² + ½ Σ_j λ_j w_j²`` (``H = XᵀX + diag(λ)``), upper
``F = ½‖X_v w − y_v‖²`` (``g(w) = X_vᵀ(X_v w − y_v)``), ``∂²_{λw} f · u = w ⊙ u``.
Implicit and finite-difference methods are evaluated at the current lower iterate
``w`` (docs/design.md#p1), so at every upper update the exact predictions are:

* CG:          ``−w ⊙ H⁻¹ g(w)``;
* Neumann(K, α): ``−w ⊙ N_K g(w)``, ``N_K = α Σ_{k≤K} (I − αH)^k``, whose error
  against CG is exactly ``w ⊙ H⁻¹ (I − αH)^{K+1} g(w)`` (the truncation term);
* finite difference: ``−s · w ⊙ g(w)`` (``H⁻¹ ≈ s I``, ``s = η`` with ``scale_by_lr``);
* SAMA with this SGD lower: ``−w ⊙ g(w)`` (identity update Jacobian, as Betty; the
  Adam case is tests/test_sama.py);
* unrolled SGD(η), K steps from the window's start ``w₀``: ``s_Kᵀ g(w_K)`` with
  ``s_{k+1} = (I − ηH) s_k − η diag(w_k)``.

The upper records the gradient its ``torch.optim`` optimizer is asked to apply, and
the run continues (3 upper updates), so the lower is *not* at its optimum after the
first window: the formulas are checked at moving iterates, with λ changing.
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import RecSGD, rel, Vars
from engines.base import available

DT = torch.float64
D = 5
K_STEPS = 3      # lower steps per upper update
ETA = 0.4        # lower learning rate


def data(seed=0, n=15):
    """``‖XᵀX‖₂ = 0.8`` and λ ∈ (0.2, 0.6): H's eigenvalues lie in (0.2, 1.4)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=gen, dtype=DT)
    X = X * (0.8 / torch.linalg.matrix_norm(X.T @ X, ord=2)) ** 0.5
    y, Xv, yv = (torch.randn(*s, generator=gen, dtype=DT) for s in ((n,), (n, D), (n,)))
    lam = 0.2 + 0.4 * torch.rand(D, generator=gen, dtype=DT)
    w0 = torch.randn(D, generator=gen, dtype=DT)
    return dict(X=X, y=y, Xv=Xv, yv=yv, lam=lam, w0=w0)


def engine(P, method, options, lower_opt=None):
    X, y, Xv, yv = P["X"], P["y"], P["Xv"], P["yv"]
    up = Vars("up", {"lam": P["lam"]},
              lambda s: 0.5 * ((Xv @ s.lo.params["w"] - yv) ** 2).sum() + 0 * s.params["lam"].sum(),
              optimizer=RecSGD, optimizer_kwargs={"lr": 0.01, "momentum": 0.3})
    lo = Vars("lo", {"w": P["w0"]},
              lambda s: 0.5 * ((X @ s.params["w"] - y) ** 2).sum()
              + 0.5 * (s.up.params["lam"] * s.params["w"] ** 2).sum(),
              optimizer_kwargs=lower_opt or {"lr": ETA},
              config=mlo.ProblemConfig(unroll_steps=K_STEPS, method=method, method_options=options))
    up.lo, lo.up = lo, up
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), up, lo


def hessian(P, lam):
    return P["X"].T @ P["X"] + torch.diag(lam)


def g_of(P, w):
    return P["Xv"].T @ (P["Xv"] @ w - P["yv"])


def run_windows(P, method, options, n_updates=3, lower_opt=None):
    """Runs ``n_updates`` upper updates; yields ``(applied gradient, λ, w at the update,
    w at the window's start)`` for each."""
    eng, up, lo = engine(P, method, options, lower_opt)
    out = []
    for _ in range(n_updates):
        lam, w_start = up.module.lam.detach().clone(), lo.module.w.detach().clone()
        eng.run(K_STEPS)          # the upper updates last, after the lower's K-th step
        eng.close_windows()
        out.append((up.optimizer.record[-1], lam, lo.module.w.detach().clone(), w_start))
    assert eng.counts() == {"lo": n_updates * K_STEPS, "up": n_updates}
    return out


def neumann_matrix(H, K, alpha):
    M = torch.eye(D, dtype=DT) - alpha * H
    return alpha * sum(torch.linalg.matrix_power(M, k) for k in range(K + 1))


def expected(P, method, options, lam, w, w_start):
    """The prediction of the module docstring for one upper update."""
    H, g = hessian(P, lam), g_of(P, w)
    if method == "cg":
        return -w * torch.linalg.solve(H, g)
    if method == "neumann":
        return -w * (neumann_matrix(H, options["iterations"], options["alpha"]) @ g)
    if method in ("finite_difference", "darts"):
        return -(ETA if options.get("scale_by_lr") else 1.0) * w * g
    if method == "sama":          # SGD lower: u = v (f is quadratic in w: the difference is exact)
        return -w * g
    assert method == "unrolled"
    A = torch.eye(D, dtype=DT) - ETA * H
    s, wk = torch.zeros(D, D, dtype=DT), w_start
    for _ in range(K_STEPS):
        s = A @ s - ETA * torch.diag(wk)
        wk = A @ wk + ETA * P["X"].T @ P["y"]
    assert rel(wk, w) < 1e-12
    return s.T @ g_of(P, wk)


# name -> (non-default options, tolerance against the method's own exact prediction)
METHODS = {
    "cg": ({"max_iter": D, "tol": 0.0}, 1e-8),
    "neumann": ({"iterations": 7, "alpha": 0.6}, 1e-10),
    "unrolled": ({}, 1e-10),
    "finite_difference": ({"epsilon": 0.02}, 1e-6),
    "darts": ({"epsilon": 0.005, "scale_by_lr": True}, 1e-6),
    "sama": ({"alpha": 0.5}, 1e-9),
}


@pytest.mark.parametrize("name", available())
def test_every_method_through_the_engine(name, measured):
    """One shared test: every registered method as the lower's method on the same P1."""
    if name not in METHODS:
        pytest.fail(f"registered method {name!r} has no entry in METHODS (options, tolerance)")
    options, tol = METHODS[name]
    P = data(seed=1)
    errs = [rel(got, expected(P, name, options, lam, w, w0))
            for got, lam, w, w0 in run_windows(P, name, options)]
    measured(f"P1 engine: {name} (3 upper updates) vs its exact prediction", max(errs), tol)


def test_cg_d_iterations_closed_form(measured):
    """CG with exactly d = 5 iterations (tol 0) is the IFT value; 3 iterations are not."""
    P = data(seed=2)
    lower_opt = {"lr": ETA, "momentum": 0.6, "weight_decay": 0.01}   # irrelevant to implicit
    errs = [rel(got, expected(P, "cg", {}, lam, w, None))
            for got, lam, w, _ in run_windows(P, "cg", {"max_iter": D, "tol": 0.0}, lower_opt=lower_opt)]
    measured("P1 engine: implicit CG (d iterations) vs closed form", max(errs), 1e-8)
    short = [rel(got, expected(P, "cg", {}, lam, w, None))
             for got, lam, w, _ in run_windows(P, "cg", {"max_iter": D - 2, "tol": 0.0}, lower_opt=lower_opt)]
    assert min(short) > 1e-6


@pytest.mark.parametrize("alpha", [0.1, 0.6, 1.0])
@pytest.mark.parametrize("K", [2, 10])
def test_neumann_error_is_truncation_term(alpha, K, measured):
    P = data(seed=3)
    I = torch.eye(D, dtype=DT)
    errs, terms = [], []
    for got, lam, w, _ in run_windows(P, "neumann", {"iterations": K, "alpha": alpha}):
        H, g = hessian(P, lam), g_of(P, w)
        assert torch.linalg.matrix_norm(I - alpha * H, ord=2) < 1
        exact = -w * torch.linalg.solve(H, g)
        trunc = w * torch.linalg.solve(H, torch.linalg.matrix_power(I - alpha * H, K + 1) @ g)
        errs.append(float(torch.linalg.vector_norm(got - exact - trunc) / torch.linalg.vector_norm(exact)))
        terms.append(rel(exact + trunc, exact))
    measured("P1 engine: Neumann error − exact truncation term (α∈{0.1,0.6,1})", max(errs), 1e-10)
    assert min(terms) > 1e-6          # the truncation term: ≥ 1e4 × the tolerance


@pytest.mark.parametrize("scale_by_lr", [False, True])
def test_finite_difference_identity_hessian_and_no_side_effects(scale_by_lr, measured):
    P = data(seed=4)
    options = {"epsilon": 0.01, "scale_by_lr": scale_by_lr}
    errs = [rel(got, expected(P, "finite_difference", options, lam, w, None))
            for got, lam, w, _ in run_windows(P, "finite_difference", options)]
    measured("P1 engine: finite difference vs identity-Hessian formula −s·w⊙g", max(errs), 1e-6)
    # gradient() evaluates f(w ± εv) functionally: the parameters stay bit-identical
    eng, up, lo = engine(P, "finite_difference", options)
    eng.run(2)                                         # mid-window: the lower has moved
    before = {n: (p.detach().clone(), p._version) for n, p in
              (("w", lo.module.w), ("lam", up.module.lam))}
    state = {k: v.clone() for k, v in lo.optimizer.state[lo.module.w].items()}
    out = eng.gradient("up")
    lam, w = up.module.lam.detach(), lo.module.w.detach()
    measured("P1 engine: finite difference vs identity-Hessian formula −s·w⊙g",
             rel(out["grad"]["lam"], expected(P, "finite_difference", options, lam, w, None)), 1e-6)
    for n, p in (("w", lo.module.w), ("lam", up.module.lam)):
        assert torch.equal(p.detach(), before[n][0]) and p._version == before[n][1], n
        assert p.grad is None
    assert all(torch.equal(v, lo.optimizer.state[lo.module.w][k]) for k, v in state.items())


@pytest.mark.parametrize("method,options", [("unrolled", {}), ("cg", {"max_iter": D, "tol": 0.0}),
                                            ("neumann", {"iterations": 3, "alpha": 0.5})])
def test_update_every_hypergradient_covers_last_window(method, options, measured):
    """Upper ``update_every=2``: a skipped readiness still ends the lower's window, so
    the applied hypergradient is the prediction for the K steps since the skipped
    readiness (unrolled: ``s_K`` restarts there; implicit: at the current iterate)."""
    P = data(seed=5)
    eng, up, lo = engine(P, method, options)
    up.config.update_every = 2
    errs = []
    for _ in range(3):
        eng.run(K_STEPS)                                  # ready, update skipped
        assert len(up.optimizer.record) == len(errs)
        lam, w_start = up.module.lam.detach().clone(), lo.module.w.detach().clone()
        eng.run(K_STEPS)                                  # ready, updates
        w = lo.module.w.detach().clone()
        errs.append(rel(up.optimizer.record[-1], expected(P, method, options, lam, w, w_start)))
    assert eng.counts() == {"lo": 6 * K_STEPS, "up": 3} and up.ready_count == 6
    measured("P1 engine: update_every=2, hypergradient of the last window vs prediction", max(errs), 1e-10)
