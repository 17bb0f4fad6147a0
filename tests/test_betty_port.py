"""The Betty port (problems/betty_logreg_hpo.py, run by examples/betty_logreg_hpo.py), its mlo part only — Betty is not needed.

Every method runs the example's outer steps (``engine.run``; its hooks reset the lower
and clamp λ) on a tiny config; CG's hypergradient at a fixed state and the unrolled
window's first hypergradient match independent naive-autograd references in float64.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import problems.betty_logreg_hpo as E

D = E.DIM


def tiny_data():
    return E.make_data(seed=3, dtype=torch.float64, n_train=40, n_val=30, n_test=30)


def lower_f(w, lam, data):
    x, y = data.train
    return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (lam * w * w).sum()


def upper_F(w, data):
    x, y = data.val
    return F.binary_cross_entropy_with_logits(x @ w, y)


def naive_ift(w, lam, data):
    """−(∂²f/∂λ∂w) H⁻¹ ∇_w F with dense autograd Hessians (no closed form, no mlo)."""
    H = torch.autograd.functional.hessian(lambda t: lower_f(t, lam, data), w)
    mixed = torch.autograd.functional.jacobian(lambda l: _grad_w(w, l, data), lam)   # [D_w, D_λ]
    v = torch.autograd.functional.jacobian(lambda t: upper_F(t, data), w)
    return -mixed.T @ torch.linalg.solve(H, v)


def _grad_w(w, lam, data):
    w = w.detach().requires_grad_()
    return torch.autograd.grad(lower_f(w, lam, data), w, create_graph=True)[0]


@pytest.mark.parametrize("method", list(E.METHODS))
def test_every_method_runs_the_outer_steps_with_hooks(method):
    torch.manual_seed(0)
    data = tiny_data()
    port = E.build_mlo(method, data, inner_steps=4, dtype=torch.float64)
    seen = []
    for _ in range(3):
        E.outer_step(port)
        seen.append(port.outer.params["lam"].detach().clone())
    assert port.engine.counts() == {"outer": 3, "inner": 12}
    lam, w = seen[-1], port.inner.params["w"].detach()
    assert torch.isfinite(lam).all() and (lam >= E.CLAMP_MIN).all()
    assert torch.isfinite(w).all() and w.abs().sum() > 0
    assert not torch.equal(seen[0], torch.ones(D, dtype=torch.float64))   # λ moved
    m = E.metrics(w, lam, data)
    assert 0.0 <= m["acc"] <= 1.0 and m["val"] < 0.6931   # better than w = 0


def test_cg_hypergradient_at_a_fixed_state_matches_naive_autograd(measured):
    data = tiny_data()
    port = E.build_mlo("cg", data, inner_steps=4, options={"max_iter": D, "tol": 0.0},
                       dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    w = 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    lam = torch.rand(D, generator=g, dtype=torch.float64) * 0.9 + 0.1   # non-uniform, > 0
    with torch.no_grad():
        port.inner.params["w"].copy_(w)
        port.outer.params["lam"].copy_(lam)
    ours = port.engine.gradient("outer")["grad"]["lam"]
    ref = naive_ift(w, lam, data)
    measured("Betty port: CG (D iterations) hypergradient vs naive autograd IFT", E.rel(ours, ref), 1e-10)
    # the example's closed form, used for the --compare-betty table, is the same thing
    measured("Betty port: closed-form IFT vs naive autograd IFT",
             E.rel(E.exact_hypergradient(w, lam, data), ref), 1e-12)


def test_unrolled_first_hypergradient_matches_naive_reverse_mode(measured):
    data = tiny_data()
    K = 5
    port = E.build_mlo("unrolled", data, inner_steps=K, dtype=torch.float64)
    got = []
    E.capture_first_gradient(port.outer.optimizer, got)
    E.outer_step(port)
    lam = torch.ones(D, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    for _ in range(K):                     # K SGD steps from the reset w = 0, differentiably
        w = w - E.INNER_LR * torch.autograd.grad(lower_f(w, lam, data), w, create_graph=True)[0]
    ref = torch.autograd.grad(upper_F(w, data), lam)[0]
    measured("Betty port: unrolled window (K=5 from w=0) vs naive reverse mode", E.rel(got[0], ref), 1e-12)
