"""Unrolled hypergradients through ``mlo.Engine`` against closed forms and references.

float64 everywhere, non-default hyperparameters. The hypergradient an upper
problem applies is read from its optimizer: the upper is a graph's top problem
(it steps with ``torch.optim``, never inside a window), so a ``torch.optim``
subclass that records ``p.grad`` at every ``step()`` sees exactly the gradient
the engine computed (own term + all paths) — no ``λ_before − λ_after``
rounding, no private API, and the run continues normally so several windows
(state taken over / handed back, truncation) are checked, not just the first.

* P1 ridge with per-feature weight decay (DESIGN.md): K ∈ {1, 2, 10} SGD steps,
  ``s_{k+1} = (I−ηH)s_k − η diag(w_k)``, hypergradient ``s_Kᵀ g(w_K)``; as K grows
  it tends to the implicit value ``−w* ⊙ H⁻¹g``.
* P2 learning-rate hypergradient ``∂w_K/∂η = −K H (I−ηH)^{K−1}(w₀−w*)``.
* P3 one-step MAML (second and first order, and ``∂/∂α``).
* Adam / AdamW / SGD(momentum, nesterov, dampening, weight decay) windows
  against central finite differences of plain ``torch.optim`` trajectories.
* A three-level chain T → M → B with both M and B unrolled against an
  independent naive autograd implementation of the documented semantics.
"""
from __future__ import annotations

import pytest
import torch

import mlo

DT = torch.float64


def rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _recording(base):
    """A ``torch.optim`` subclass recording the gradients it is asked to apply."""

    class Recording(base):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.record = []

        def step(self, closure=None):
            self.record.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


RecSGD = _recording(torch.optim.SGD)
RecAdam = _recording(torch.optim.Adam)


class Vars(mlo.Problem):
    """A problem with explicit tensors whose loss is a plain function ``loss(self)``."""

    def __init__(self, name, params, loss, hyper=None, **kw):
        super().__init__(name, params=params, **kw)
        self._loss, self._hyper = loss, hyper

    def training_step(self, batch):
        return self._loss(self, batch)

    def optimizer_hyperparameters(self):
        return self._hyper(self) if self._hyper else None


class VarsNoHyper(Vars):
    # The engine only calls optimizer_hyperparameters when it is overridden.
    optimizer_hyperparameters = mlo.Problem.optimizer_hyperparameters


def make(name, params, loss, hyper=None, **kw):
    return (Vars if hyper else VarsNoHyper)(name, params, loss, hyper, **kw)


# --------------------------------------------------------------------- P1
def ridge(seed=0, n=20, d=5):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT) / n ** 0.5
    y = torch.randn(n, generator=gen, dtype=DT)
    Xv = torch.randn(n, d, generator=gen, dtype=DT) / n ** 0.5
    yv = torch.randn(n, generator=gen, dtype=DT)
    lam = 0.2 + 0.7 * torch.rand(d, generator=gen, dtype=DT)
    w0 = torch.randn(d, generator=gen, dtype=DT)
    return X, y, Xv, yv, lam, w0


def ridge_engine(K, eta, seed=0, upper_lr=0.3):
    X, y, Xv, yv, lam, w0 = ridge(seed)
    up = make("up", {"lam": lam}, lambda s, b: 0.5 * ((Xv @ s.lo.params["w"] - yv) ** 2).sum()
              + 0 * s.params["lam"].sum(), optimizer=RecSGD,
              optimizer_kwargs={"lr": upper_lr, "momentum": 0.6})
    lo = make("lo", {"w": w0}, lambda s, b: 0.5 * ((X @ s.params["w"] - y) ** 2).sum()
              + 0.5 * (s.up.params["lam"] * s.params["w"] ** 2).sum(),
              optimizer_kwargs={"lr": eta}, config=mlo.ProblemConfig(unroll_steps=K))
    up.lo, lo.up = lo, up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    return eng, up, lo, (X, y, Xv, yv)


def ridge_unrolled(X, y, Xv, yv, lam, w, K, eta):
    """Closed form: ``s_{k+1} = (I−ηH)s_k − η diag(w_k)``; returns ``(s_Kᵀ g(w_K), w_K)``."""
    d = lam.numel()
    H = X.T @ X + torch.diag(lam)
    A = torch.eye(d, dtype=DT) - eta * H
    s = torch.zeros(d, d, dtype=DT)
    for _ in range(K):
        s = A @ s - eta * torch.diag(w)
        w = A @ w + eta * X.T @ y
    return s.T @ (Xv.T @ (Xv @ w - yv)), w


@pytest.mark.parametrize("K", [1, 2, 10])
def test_p1_ridge_unrolled_sgd_closed_form(K):
    eta = 0.35
    eng, up, lo, (X, y, Xv, yv) = ridge_engine(K, eta)
    errs = []
    for window in range(3):                       # three outer steps, three windows
        lam = up.module.lam.detach().clone()
        w = lo.module.w.detach().clone()          # the window starts here (truncated)
        for _ in range(K):
            eng.step()
        assert up.step_count == window + 1 and lo.step_count == K * (window + 1)
        exact, wK = ridge_unrolled(X, y, Xv, yv, lam, w, K, eta)
        errs.append(rel(up.optimizer.record[-1][0], exact))
        assert rel(lo.module.w.detach(), wK) < 1e-12      # iterates written back
    print(f"P1 K={K}: max rel err {max(errs):.2e}")
    assert max(errs) < 1e-10


def test_p1_unrolled_tends_to_implicit():
    """K=2000 small-step unroll → ``−w*_j (H⁻¹g)_j``, with the error shrinking in K."""
    eta = 0.1
    X, y, Xv, yv, lam, _ = ridge(0)
    H = X.T @ X + torch.diag(lam)
    w_star = torch.linalg.solve(H, X.T @ y)
    implicit = -w_star * torch.linalg.solve(H, Xv.T @ (Xv @ w_star - yv))
    errs = {}
    for K in (10, 100, 2000):
        eng, up, lo, _ = ridge_engine(K, eta)
        eng.run(K)
        errs[K] = rel(up.optimizer.record[0][0], implicit)
    # state tolerance: the unroll's distance to the fixed point, ‖(I−ηH)^K‖ (H ≻ λ_min I)
    contraction = float(1 - eta * torch.linalg.eigvalsh(H)[0]) ** 2000
    print(f"P1 unrolled → implicit: {errs}, contraction^2000={contraction:.1e}")
    assert errs[10] > errs[100] > errs[2000]
    assert errs[2000] < 1e-10 + 1e3 * contraction


# --------------------------------------------------------------------- P2
def test_p2_learning_rate_hypergradient():
    gen = torch.Generator().manual_seed(1)
    d, K = 5, 4
    Q = torch.randn(d, d, generator=gen, dtype=DT)
    H = Q @ Q.T / d + 0.5 * torch.eye(d, dtype=DT)
    b = torch.randn(d, generator=gen, dtype=DT)
    w_t = torch.randn(d, generator=gen, dtype=DT)
    w0 = torch.randn(d, generator=gen, dtype=DT)
    w_star = torch.linalg.solve(H, b)
    up = make("up", {"eta": torch.tensor(0.23, dtype=DT)},
              lambda s, _: 0.5 * ((s.lo.params["w"] - w_t) ** 2).sum() + 0 * s.params["eta"],
              optimizer=RecSGD, optimizer_kwargs={"lr": 1e-3, "momentum": 0.3})
    lo = make("lo", {"w": w0}, lambda s, _: 0.5 * s.params["w"] @ H @ s.params["w"] - b @ s.params["w"],
              hyper=lambda s: {"lr": s.up.params["eta"]},
              optimizer_kwargs={"lr": 0.777}, config=mlo.ProblemConfig(unroll_steps=K))
    up.lo, lo.up = lo, up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    errs = []
    I = torch.eye(d, dtype=DT)
    for _ in range(3):
        eta = float(up.module.eta.detach())
        e0 = lo.module.w.detach() - w_star
        eng.run(K)
        A = I - eta * H
        wK = w_star + torch.linalg.matrix_power(A, K) @ e0
        dw = -K * H @ torch.linalg.matrix_power(A, K - 1) @ e0
        assert rel(lo.module.w.detach(), wK) < 1e-12
        errs.append(rel(up.optimizer.record[-1][0], dw @ (wK - w_t)))
    print(f"P2 lr hypergradient: max rel err {max(errs):.2e}")
    assert max(errs) < 1e-10


# --------------------------------------------------------------------- P3
def maml(first_order: bool, learn_alpha: bool, alpha=0.3):
    gen = torch.Generator().manual_seed(2)
    n, m, d = 12, 9, 4
    Xs, ys = torch.randn(n, d, generator=gen, dtype=DT), torch.randn(n, generator=gen, dtype=DT)
    Xq, yq = torch.randn(m, d, generator=gen, dtype=DT), torch.randn(m, generator=gen, dtype=DT)
    theta = torch.randn(d, generator=gen, dtype=DT)
    meta = make("meta", {"theta": theta, "alpha": torch.tensor(alpha, dtype=DT)},
                lambda s, _: 0.5 * ((Xq @ (s.params["theta"] + s.task.params["delta"]) - yq) ** 2).sum() / m
                + 0 * s.params["alpha"], optimizer=RecSGD, optimizer_kwargs={"lr": 0.01})
    task = make("task", {"delta": torch.zeros(d, dtype=DT)},
                lambda s, _: 0.5 * ((Xs @ (s.meta.params["theta"] + s.params["delta"]) - ys) ** 2).sum() / n,
                hyper=(lambda s: {"lr": s.meta.params["alpha"]}) if learn_alpha else None,
                optimizer_kwargs={"lr": alpha},
                config=mlo.ProblemConfig(unroll_steps=1, method_options={"first_order": first_order}))
    meta.task, task.meta = task, meta
    eng = mlo.Engine([task, meta], {"u2l": {meta: [task]}, "l2u": {task: [meta]}})
    eng.step()
    A, bs = Xs.T @ Xs / n, Xs.T @ ys / n
    th1 = (torch.eye(d, dtype=DT) - alpha * A) @ theta + alpha * bs
    r = Xq.T @ (Xq @ th1 - yq) / m
    g_theta, g_alpha = meta.optimizer.record[0]
    return g_theta, g_alpha, A, bs, theta, r


def test_p3_maml_second_order_and_alpha():
    g_theta, g_alpha, A, bs, theta, r = maml(first_order=False, learn_alpha=True)
    e_theta = rel(g_theta, (torch.eye(len(theta), dtype=DT) - 0.3 * A) @ r)
    e_alpha = rel(g_alpha, -(A @ theta - bs) @ r)
    print(f"P3 second order: θ {e_theta:.2e}, α {e_alpha:.2e}")
    assert e_theta < 1e-10 and e_alpha < 1e-10


def test_p3_maml_first_order():
    g_theta, g_alpha, *_, r = maml(first_order=True, learn_alpha=False)
    e_theta = rel(g_theta, r)
    print(f"P3 first order: θ {e_theta:.2e}")
    assert e_theta < 1e-10 and float(g_alpha.abs()) == 0.0
