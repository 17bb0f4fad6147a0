"""The ridge problem shared by the Problem.call, update_every_iterations and records tests.

float64, P1 ridge of docs/design.md#p1 with the weight decay ``λ`` read by the lower's loss
``½‖Xw − y‖² + ½ Σ_j λ_j w_j²`` (``H = XᵀX + diag(λ)``), upper loss ``½‖X_v w − y_v‖²``
(``g(w) = X_vᵀ(X_v w − y_v)``). The lower's module is read either through
``Problem.call("predict", ·)`` (:class:`PredictOnly`, whose ``forward`` must never run)
or through ``problem(x)`` (:class:`ForwardLinear`). Closed forms:

* implicit (CG, d iterations) at the current iterate ``w``: ``−w ⊙ H⁻¹ g(w)`` (:func:`ift`);
* unrolled, K SGD steps of size η: ``s_{k+1} = (I − ηH) s_k − η diag(w_k)``,
  hypergradient ``s_Kᵀ g(w_K)`` (:func:`unrolled_sgd`).
"""
from __future__ import annotations

import torch
from torch import nn

import mlo
from _helpers import recording

DT = torch.float64
D = 4
RecSGD = recording(torch.optim.SGD)


def ridge_data(seed=0, n=12):
    """Seeded ``X, y, Xv, yv``, the lower's start ``w0`` and ``λ ∈ [0.5, 1.5)``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    return dict(X=r(n, D), y=r(n), Xv=r(n, D), yv=r(n), w0=r(D), lam=0.5 + torch.rand(D, generator=g, dtype=DT))


class PredictOnly(nn.Module):
    """``predict(X) = X w``; its ``forward`` must never run."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def predict(self, X, scale=1.0):
        return scale * (X @ self.w)

    def forward(self, *a, **kw):
        raise AssertionError("forward called instead of predict")


class ForwardLinear(nn.Module):
    """``forward(X) = X w``: the ``problem(x)`` counterpart of :class:`PredictOnly`."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, X, scale=1.0):
        return scale * (X @ self.w)


class RidgeLo(mlo.Problem):
    """The ridge lower; reads its module through ``call`` when ``via_call``."""

    def __init__(self, P, via_call, method, opts, K, lr, **kw):
        mod = PredictOnly(P["w0"]) if via_call else ForwardLinear(P["w0"])
        super().__init__("lo", module=mod, optimizer_kwargs={"lr": lr},
                         config=mlo.ProblemConfig(method=method, method_options=opts, unroll_steps=K), **kw)
        self.P, self.via_call = P, via_call

    def predict(self, X):
        return self.call("predict", X, scale=1.0) if self.via_call else self(X, scale=1.0)

    def training_step(self, batch):
        P, w = self.P, self.params["w"]
        return 0.5 * ((self.predict(P["X"]) - P["y"]) ** 2).sum() + 0.5 * (self.up.params["lam"] * w ** 2).sum()


class RidgeUp(mlo.Problem):
    """The validation upper, plus ``own · ‖λ‖²`` (a direct term of its own)."""

    def __init__(self, P, own=0.0, **kw):
        kw.setdefault("optimizer", RecSGD)
        kw.setdefault("optimizer_kwargs", {"lr": 1e-3})
        super().__init__("up", params={"lam": P["lam"]}, **kw)
        self.P, self.own = P, own

    def training_step(self, batch):
        P = self.P
        fit = 0.5 * ((self.lo.predict(P["Xv"]) - P["yv"]) ** 2).sum()
        return fit + self.own * (self.params["lam"] ** 2).sum()


def ridge_engine(P, via_call, method="cg", opts=None, K=3, lr=0.05, own=0.0, declare=True, up_kw=None, **lo_kw):
    """``(engine, lower, upper)``; ``declare=False`` leaves out the l2u edge."""
    lo = RidgeLo(P, via_call, method, {"max_iter": D, "tol": 0.0} if opts is None else opts, K, lr, **lo_kw)
    up = RidgeUp(P, own, **(up_kw or {}))
    lo.up, up.lo = up, lo
    deps = {"u2l": {up: [lo]}, "l2u": {lo: [up]}} if declare else {"u2l": {up: [lo]}}
    return mlo.Engine([lo, up], deps), lo, up


def ift(P, w, lam):
    """The implicit hypergradient ``−w ⊙ H⁻¹ g(w)`` at ``w``."""
    H = P["X"].T @ P["X"] + torch.diag(lam)
    g = P["Xv"].T @ (P["Xv"] @ w - P["yv"])
    return -w * torch.linalg.solve(H, g)


def unrolled_sgd(P, lam, K, eta):
    """``(w_K, s_Kᵀ g(w_K))`` after K SGD steps of size ``eta`` from ``w0``."""
    H = P["X"].T @ P["X"] + torch.diag(lam)
    w, s = P["w0"].clone(), torch.zeros(D, D, dtype=DT)
    for _ in range(K):
        s = (torch.eye(D, dtype=DT) - eta * H) @ s - eta * torch.diag(w)
        w = w - eta * (H @ w - P["X"].T @ P["y"])
    return w, s.T @ (P["Xv"].T @ (P["Xv"] @ w - P["yv"]))
