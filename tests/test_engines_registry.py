"""One test that runs every registered hypergradient method on the same problem.

A new method must be added to ``METHODS`` (options and tolerance against the
exact implicit value — or, for a method whose approximation is not comparable with
it here, against its own closed form in ``OWN_CLOSED_FORM``), otherwise its test fails.

Problem: P1 ridge ``f(w, λ) = ½‖Xw − y‖² + ½ Σ λ_j w_j²`` with ``H ≈ 2I`` (so
the finite-difference approximation ``H⁻¹ ≈ η I``, η = 0.5, is within a few
percent), the lower parameters split over two tensors of different shapes
(``[2, 2]`` and ``[2]``) and an extra upper input the lower loss never reads
(its result must be zeros). ``lower.optimizer`` is the view of a real
``torch.optim.Adam`` after two steps from ``w = 0`` (for methods that need it).
"""
from __future__ import annotations

from types import MappingProxyType

import pytest
import torch

from engines.base import Lower, available, get

DT = torch.float64
D = 6
ETA = 0.5

# name -> (options, max relative error against the exact implicit value)
METHODS = {
    "cg": ({"max_iter": D, "tol": 1e-13, "damping": 0.0}, 1e-10),
    "neumann": ({"iterations": 30, "alpha": ETA}, 1e-10),
    "unrolled": ({}, 1e-10),  # outputs from a 40-step unroll, contraction ≈ 0.1
    "finite_difference": ({"scale_by_lr": True}, 0.1),  # H⁻¹ ≈ η I
    "darts": ({"scale_by_lr": True}, 0.1),
    "sama": ({"alpha": 0.3}, 1e-10),  # vs its own closed form (f is quadratic in w: exact)
}
BETAS, ADAM_EPS = (0.8, 0.95), 1e-6


def split(w):
    return w[:4].reshape(2, 2), w[4:]


def join(params):
    return torch.cat([params[0].reshape(-1), params[1]])


def problem():
    gen = torch.Generator().manual_seed(11)
    n = 12
    X = torch.randn(n, D, generator=gen, dtype=DT)
    X = X * (0.1 / torch.linalg.matrix_norm(X.T @ X, ord=2)) ** 0.5
    y = torch.randn(n, generator=gen, dtype=DT)
    Xv = torch.randn(n, D, generator=gen, dtype=DT)
    yv = torch.randn(n, generator=gen, dtype=DT)
    lam = 1.95 + 0.1 * torch.rand(D, generator=gen, dtype=DT)
    H = X.T @ X + torch.diag(lam)
    w_star = torch.linalg.solve(H, X.T @ y)
    g = Xv.T @ (Xv @ w_star - yv)
    exact = -w_star * torch.linalg.solve(H, g)

    def f(params, inputs):
        w, (lam_, _unused) = join(params), inputs
        return 0.5 * torch.sum((X @ w - y) ** 2) + 0.5 * torch.sum(lam_ * w ** 2)

    lam_t = lam.clone().requires_grad_()
    unused = torch.ones(3, dtype=DT, requires_grad=True)
    # a long unroll of GD from w0 = 0, attached to λ, for the unrolled method
    w = tuple(t.clone().requires_grad_() for t in split(torch.zeros(D, dtype=DT)))
    for _ in range(40):
        grads = torch.autograd.grad(f(w, (lam_t, unused)), w, create_graph=True)
        w = tuple(p - ETA * gp for p, gp in zip(w, grads))
    params = tuple(t.clone().requires_grad_() for t in split(w_star))
    lower = Lower(params=params, inputs=(lam_t, unused), loss_fn=f, outputs=w, lr=ETA,
                  optimizer=adam_view(f, (lam.clone(), unused.detach())))
    return lower, split(g), exact


def adam_view(f, inputs):
    """``Lower.optimizer`` as the engine builds it, from a real ``torch.optim.Adam``
    (non-default betas and eps) after two steps on ``f`` from ``w = 0``."""
    ps = [torch.nn.Parameter(t.clone()) for t in split(torch.zeros(D, dtype=DT))]
    opt = torch.optim.Adam(ps, lr=ETA, betas=BETAS, eps=ADAM_EPS)
    for _ in range(2):
        grads = torch.autograd.grad(f(tuple(ps), inputs), ps)
        for p, gp in zip(ps, grads):
            p.grad = gp
        opt.step()
    (group,) = opt.param_groups
    hyper = {k: v for k, v in group.items() if k != "params"}
    return [MappingProxyType(dict(hyper, state=MappingProxyType(dict(opt.state[p])), grad=p.grad.clone(),
                                  type="Adam")) for p in ps]


def sama_closed_form(lower, v):
    """``−∂²_{λw} f · (η D ⊙ v) = −w ⊙ η D ⊙ v`` (Betty's ``precondition_adam`` form of D)."""
    (b1, b2), out = BETAS, []
    for p, vi, o in zip(lower.params, v, lower.optimizer):
        m, s, g = o["state"]["exp_avg"], o["state"]["exp_avg_sq"], o["grad"]
        m_old, s_old = (m - (1 - b1) * g) / b1, (s - (1 - b2) * g * g) / b2
        Dm = ((1 - b1) * b2 * s_old - b1 * (1 - b2) * g * m_old) / (s.sqrt() + ADAM_EPS) ** 3
        out.append(-p.detach() * ETA * Dm * vi)
    return join(out)


# Methods whose approximation is not comparable with the implicit value here.
OWN_CLOSED_FORM = {"sama": sama_closed_form}


@pytest.mark.parametrize("name", available())
def test_every_method_against_exact_implicit(name, measured):
    if name not in METHODS:
        pytest.fail(f"registered method {name!r} has no entry in METHODS (options, tolerance)")
    options, tol = METHODS[name]
    lower, v, exact = problem()
    before = tuple(p.detach().clone() for p in lower.params)
    out = get(name)(lower, v, **options)

    assert isinstance(out, tuple) and len(out) == len(lower.inputs)
    for r, x in zip(out, lower.inputs):
        assert r.shape == x.shape and r.dtype == x.dtype and r.device == x.device
        assert not r.requires_grad and r.grad_fn is None
    assert torch.equal(out[1], torch.zeros(3, dtype=DT))  # input the loss never reads
    ref = OWN_CLOSED_FORM[name](lower, v) if name in OWN_CLOSED_FORM else exact
    err = float(torch.linalg.vector_norm(out[0] - ref) / torch.linalg.vector_norm(ref))
    what = "its closed form" if name in OWN_CLOSED_FORM else "exact implicit"
    measured(f"registry: {name} vs {what} (shared P1 problem)", err, tol)
    # no side effects on the lower iterate or on .grad
    for p, b in zip(lower.params, before):
        assert torch.equal(p.detach(), b) and p.grad is None
    assert all(x.grad is None for x in lower.inputs)


@pytest.mark.parametrize("name", available())
def test_every_method_create_graph(name, measured):
    if name not in METHODS:
        pytest.fail(f"registered method {name!r} has no entry in METHODS (options, tolerance)")
    options, _ = METHODS[name]
    lower, v, _ = problem()
    plain = get(name)(lower, v, **options)
    graph = get(name)(lower, v, create_graph=True, **options)
    assert graph[0].requires_grad
    err = max(float((b.detach() - a).abs().max() / a.abs().max().clamp_min(1e-300))
              for a, b in zip(plain, graph) if a.abs().max() > 0)
    measured("registry: create_graph=True result vs plain result", err, 1e-12)
    assert torch.equal(graph[1].detach(), plain[1])


def test_unknown_method_lists_choices():
    with pytest.raises(KeyError) as info:
        get("no_such_method")
    msg = str(info.value)
    assert "no_such_method" in msg
    for name in available():
        assert name in msg
