"""Differentiable Adam/AdamW through elements whose gradient is exactly 0.

A lower parameter whose gradient is identically 0 but still a graph-connected
function of the upper variable λ — a softmax attention key bias is the real example —
has ``m = v = 0`` in Adam. Autograd's ``sqrt'(0) = inf`` then met the factor ``m = 0``
(``inf·0 = NaN``) and silently turned the whole hypergradient into NaN. The exact
derivative of ``m/(√v + eps)`` at ``g = 0`` is ``∂m/eps``: the √v term contributes
nothing. Two lower problems, float64, non-default hyperparameters:

* ``zero_times``: a robust regression plus ``Σ w_dead ⊙ 0·cos(Cλ + D w_live)``, whose
  gradient in ``w_dead`` is ``0 · (λ-dependent)``;
* ``attention``: ``L`` queries attend to one context token ``c(λ) = tanh(Cλ)``; with a
  single key the softmax is exactly 1 and its backward exactly 0, so the query/key
  weights and the key bias ``b_k`` (initialised at 0, as biases are) get gradients that
  are exactly 0 in floating point, not only analytically (with several keys the key
  bias's gradient is 0 analytically but rounding-level numerically).

Checks: K=3 differentiable steps (``FunctionalOptimizer.from_torch``) give (1) finite
derivatives of order 1–3, (2) a first derivative equal to central differences of the
same K ``torch.optim`` steps as a function of λ, and a second derivative equal to
central differences of the first, (3) a forward trajectory bitwise equal to
``torch.optim``'s. Then the same through ``mlo.Engine`` (unrolled AdamW lower).
"""
from __future__ import annotations

import math

import pytest
import torch

import mlo
from _helpers import Vars, recording, rel
from mlo.optim import FunctionalOptimizer, _sqrt

DT = torch.float64
K = 3
H = 1e-6


def _gen(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731


def zero_times(decay_coupled: bool):
    """Lower ``[w_live (4), w_dead (2)]``; ``∇w_dead f = 0·cos(Cλ + D w_live)``."""
    r = _gen(11)
    X, y, C, D, B = r(8, 4), r(8), r(2, 3), r(2, 4), r(8, 3)
    Xv, yv, u = r(6, 4), r(6), r(2)
    # Adam's coupled weight decay adds wd·w to the gradient: w_dead = 0 keeps it exactly 0
    init = [r(4), torch.zeros(2, dtype=DT) if decay_coupled else r(2)]

    def f(ps, lam):
        w, dead = ps
        fit = torch.log(torch.cosh(X @ w - y - 0.5 * torch.tanh(B @ lam))).mean()
        return fit + (dead * 0 * torch.cos(C @ lam + D @ w)).sum()

    def F(ps, lam):
        w, dead = ps
        return 0.5 * ((Xv @ w - yv) ** 2).mean() + (u * dead).sum() + 0.05 * (lam ** 2).sum()

    return init, f, F, r(3)


def attention(decay_coupled: bool):
    """Lower ``[W_q, W_k, b_k, W_v, b_v]`` of a one-key attention ``x_i → softmax(q_i·k/√d) v``."""
    r = _gen(12)
    d, L = 3, 5
    x, xv, t, tv, C = r(L, d), r(L, d), r(L, d), r(L, d), r(d, 2)
    init = [r(d, d), r(d, d), torch.zeros(d, dtype=DT), r(d, d), r(d)]
    U = [r(d, d), r(d, d), r(d), r(d, d), r(d)]

    def attend(ps, lam, x):
        Wq, Wk, bk, Wv, bv = ps
        c = torch.tanh(C @ lam)[None]                       # the single key/value token [1, d]
        q, k, v = x @ Wq.T, c @ Wk.T + bk, c @ Wv.T + bv    # [L, d], [1, d], [1, d]
        w = (q @ k.T / math.sqrt(d)).softmax(dim=-1)        # [L, 1], exactly 1
        return x + w @ v                                    # [L, d]

    def f(ps, lam):
        return 0.5 * ((attend(ps, lam, x) - t) ** 2).mean()

    def F(ps, lam):
        return (0.5 * ((attend(ps, lam, xv) - tv) ** 2).mean() + 0.05 * (lam ** 2).sum()
                + 0.1 * sum((a * p).sum() for a, p in zip(U, ps)))  # reads b_k, W_q, W_k too

    return init, f, F, r(2)


PROBLEMS = {"zero_times": zero_times, "attention": attention}
CONFIGS = [
    (torch.optim.Adam, dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.05)),
    (torch.optim.Adam, dict(lr=0.04, betas=(0.7, 0.95), eps=1e-8, amsgrad=True, maximize=True)),
    (torch.optim.Adam, dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.02, amsgrad=True,
                            differentiable=True)),   # torch's tensor-step branch
    (torch.optim.AdamW, dict(lr=0.05, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=0.03, betas=(0.85, 0.9), eps=1e-3, weight_decay=0.2)),
]
GRID = [(p, cls, kw) for p in PROBLEMS for cls, kw in CONFIGS]
IDS = [f"{p}-{cls.__name__}-{kw}" for p, cls, kw in GRID]


def setup(prob, cls, kw):
    return PROBLEMS[prob](cls is torch.optim.Adam and kw.get("weight_decay", 0) > 0)


def torch_trajectory(cls, kw, init, f, lam):
    """K plain ``torch.optim`` steps at a fixed (detached) λ; the parameters after each."""
    ps = [p.clone().requires_grad_() for p in init]
    if kw.get("differentiable"):  # torch's differentiable mode updates non-leaf tensors in place
        ps = [p.clone() for p in ps]
    opt, traj = cls(ps, **kw), []
    for _ in range(K):
        for p, g in zip(ps, torch.autograd.grad(f(ps, lam), ps)):
            p.grad = g
        opt.step()
        traj.append([p.detach().clone() for p in ps])
    return traj


def functional_trajectory(cls, kw, init, f, lam):
    real = [p.clone().requires_grad_() for p in init]
    fopt = FunctionalOptimizer.from_torch(cls(real, **kw), real)
    ps, traj = real, []
    for _ in range(K):
        ps = fopt.step(ps, torch.autograd.grad(f(ps, lam), ps, create_graph=True))
        traj.append(ps)
    return traj


def bits(t):
    return t.detach().view(torch.int64)


def test_sqrt_bitwise_and_zero_derivative():
    """``_sqrt`` equals ``Tensor.sqrt`` bit for bit on ``v >= 0`` (0, subnormals, inf, NaN)."""
    for dt, ints in ((torch.float32, torch.int32), (torch.float64, torch.int64)):
        fi = torch.finfo(dt)
        gen = torch.Generator().manual_seed(0)
        v = torch.cat([torch.tensor([0.0, fi.smallest_normal / 2 ** 10, fi.tiny, fi.eps, 1.0, fi.max,
                                     math.inf, math.nan], dtype=dt),
                       torch.rand(10_000, generator=gen, dtype=dt)
                       * torch.pow(10.0, torch.randint(-30, 30, (10_000,), generator=gen)).to(dt)])
        assert torch.equal(_sqrt(v).view(ints), v.sqrt().view(ints))
    v = torch.tensor([0.0, 0.25, 4.0], dtype=DT, requires_grad=True)
    (d1,) = torch.autograd.grad(_sqrt(v).sum(), v, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), v)
    assert d1.tolist() == [0.0, 1.0, 0.25] and d2.tolist() == [0.0, -2.0, -1 / 32]  # -¼ v^(-3/2)


@pytest.mark.parametrize("prob,cls,kw", GRID, ids=IDS)
def test_k_steps_through_zero_gradients(prob, cls, kw, measured):
    init, f, F, lam0 = setup(prob, cls, kw)
    lam = lam0.clone().requires_grad_()
    traj = functional_trajectory(cls, kw, init, f, lam)
    # the case is exercised: some update directions (gradient + coupled weight decay) are
    # exactly 0 while graph-connected to λ
    ps0 = [p.clone().requires_grad_() for p in init]
    g0 = torch.autograd.grad(f(ps0, lam), ps0, create_graph=True)
    wd = kw.get("weight_decay", 0) if cls is torch.optim.Adam else 0
    assert any(((g + wd * p) == 0).any() for g, p in zip(g0, init)) and all(g.requires_grad for g in g0)

    # (3) forward: bitwise torch.optim (single-tensor and, where it exists, multi-tensor path)
    for foreach in (False,) if kw.get("differentiable") else (False, True):
        ref = torch_trajectory(cls, dict(kw, foreach=foreach), init, f, lam0)
        diff = sum(int((bits(a) != bits(b)).sum()) for sa, sb in zip(traj, ref) for a, b in zip(sa, sb))
        measured("Adam/AdamW with exactly-zero gradients: elements not bitwise equal to torch.optim",
                 diff, 0)

    # (1) + (2) first derivative: finite, = central FD of the torch.optim trajectory
    J = F(traj[-1], lam)
    (d1,) = torch.autograd.grad(J, lam, create_graph=True)
    assert torch.isfinite(d1).all()

    def J_torch(lam_):
        return F(torch_trajectory(cls, kw, init, f, lam_)[-1], lam_).item()

    fd = torch.stack([torch.tensor((J_torch(lam0 + H * e) - J_torch(lam0 - H * e)) / (2 * H), dtype=DT)
                      for e in torch.eye(len(lam0), dtype=DT)])
    measured("K=3 Adam/AdamW steps through exactly-zero gradients: dJ/dλ vs central FD of torch.optim",
             rel(d1.detach(), fd), 1e-6)

    # second order (finite, = central FD of the first derivative) and third order (finite)
    u = torch.linspace(0.5, -1.0, len(lam0), dtype=DT)
    (d2,) = torch.autograd.grad(d1 @ u, lam, create_graph=True)
    (d3,) = torch.autograd.grad(d2 @ u, lam)
    assert torch.isfinite(d2).all() and torch.isfinite(d3).all()

    def grad_at(lam_):
        lam_ = lam_.clone().requires_grad_()
        return torch.autograd.grad(F(functional_trajectory(cls, kw, init, f, lam_)[-1], lam_), lam_)[0]

    fd2 = (grad_at(lam0 + H * u) - grad_at(lam0 - H * u)) / (2 * H)
    measured("K=3 Adam/AdamW steps through exactly-zero gradients: d²J/dλ² u vs central FD of dJ/dλ",
             rel(d2.detach(), fd2), 1e-6)


RecSGD = recording(torch.optim.SGD)
NAMES = ["Wq", "Wk", "bk", "Wv", "bv"]
ADAMW = dict(lr=0.05, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1, amsgrad=True)


def test_engine_unrolled_adamw_through_zero_gradient(measured):
    """Two windows of K=3 AdamW steps on the one-key attention (``b_k``'s gradient is
    exactly 0); the upper's recorded hypergradients against central FD of a plain loop."""
    init, f, F, lam0 = attention(decay_coupled=False)
    lower = lambda s: [s.params[n] for n in NAMES]  # noqa: E731
    up = Vars("up", {"lam": lam0}, lambda s: F(lower(s.lo), s.params["lam"]),
              optimizer=RecSGD, optimizer_kwargs={"lr": 0.3, "momentum": 0.5})
    lo = Vars("lo", dict(zip(NAMES, init)), lambda s: f(lower(s), s.up.params["lam"]),
              optimizer=torch.optim.AdamW, optimizer_kwargs=ADAMW,
              config=mlo.ProblemConfig(method="unrolled", unroll_steps=K))
    up.lo, lo.up = lo, up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    lams = []
    for _ in range(2):
        lams.append(up.module.lam.detach().clone())
        eng.run(K)

    def naive(windows):
        """Plain AdamW, K steps per window, state carried over; the final parameters."""
        ps = [p.clone().requires_grad_() for p in init]
        opt = torch.optim.AdamW(ps, **ADAMW)
        for lam in windows:
            for _ in range(K):
                for p, g in zip(ps, torch.autograd.grad(f(ps, lam), ps)):
                    p.grad = g
                opt.step()
        return [p.detach() for p in ps]

    final = naive(lams)
    flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])  # noqa: E731
    measured("engine unrolled AdamW window through exactly-zero gradients: trajectory vs naive loop",
             rel(flat(lower(lo)), flat(final)), 1e-13)
    errs = []
    for j, lam in enumerate(lams):
        got = up.optimizer.record[j][0]
        assert torch.isfinite(got).all()
        fd = torch.stack([torch.tensor((F(naive(lams[:j] + [lam + H * e]), lam + H * e)
                                        - F(naive(lams[:j] + [lam - H * e]), lam - H * e)).item() / (2 * H),
                                       dtype=DT) for e in torch.eye(len(lam), dtype=DT)])
        errs.append(rel(got, fd))
    measured("engine unrolled AdamW through exactly-zero gradients (2 windows K=3) vs central FD", max(errs), 1e-6)
