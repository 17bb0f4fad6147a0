"""Two top problems sharing one lower problem (float64, naive references).

Graph: ``u2l = {U1: [L], U2: [L]}`` (L's loss reads u1 and u2),
``l2u = {L: [U1, U2]}`` (each top's loss reads θ). Each top has exactly one path,
``(U1, L, U1)`` resp. ``(U2, L, U2)``::

    L   f_L(θ; u1, u2) = ½ Σ_i s_i(u1) (θ_i − c_i(u1, u2))² + 0.1 Σ log cosh θ_i,
        s(u1) = exp(0.3 W sin u1),  c = B (u1[:2] ⊙ tanh u2)
        (∂²f_L/∂θ∂u2 depends on u1, and the product saves u1 itself in the graph
        that U2's backprop traverses)
    U1  F_1(u1; θ) = Σ log cosh(P₁θ − y₁) + 0.05‖u1‖²
    U2  F_2(u2; θ) = ½‖P₂θ − y₂‖² + 0.1 Σ cos u2

Schedule (engine docstring): L steps every iteration; both tops become ready after
L's ``unroll_steps = K`` steps, in the same iteration, U1 before U2 (the user's
order breaks the tie). U2 has ``update_every = 2``: it updates on every 2nd
readiness, but every readiness consumes L's window. With L unrolled, U1's
hypergradient backpropagates through L's window to L's reads of u1 only, then U1
steps *in place*; U2 then backpropagates through the *same* window to L's reads of
u2 — through a graph that saved the pre-update u1 (the values L's steps saw).
With L implicit (CG), each VJP is evaluated at the current state: for U2 that
state already contains U1's update of this iteration (Gauss–Seidel order).
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import RecSGD, rel, Vars

DT = torch.float64
K = 3                  # L's unroll_steps
N = 4 * K              # iterations: U1 updates 4 times, U2 twice
SGD_L = dict(lr=0.15, momentum=0.6, weight_decay=0.01)
SGD_U1 = dict(lr=0.1, momentum=0.5)
SGD_U2 = dict(lr=0.2)


def data(seed=11):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    return dict(W=r(4, 3), B=r(4, 2), P1=r(3, 4), y1=r(3), P2=r(2, 4), y2=r(2),
                u1=r(3), u2=r(2), th=r(4))


def losses(d):
    lc = lambda x: torch.log(torch.cosh(x)).sum()  # noqa: E731

    def f_L(th, u1, u2):
        s = torch.exp(0.3 * d["W"] @ torch.sin(u1))
        c = d["B"] @ (u1[:2] * torch.tanh(u2))     # mul saves (a view of) u1 for ∂/∂u2
        return 0.5 * (s * (th - c) ** 2).sum() + 0.1 * lc(th)

    def F1(u1, th):
        return lc(d["P1"] @ th - d["y1"]) + 0.05 * (u1 ** 2).sum()

    def F2(u2, th):
        return 0.5 * ((d["P2"] @ th - d["y2"]) ** 2).sum() + 0.1 * torch.cos(u2).sum()

    return f_L, F1, F2


def build(d, method="unrolled", options=None, order=("U1", "U2", "L")):
    f_L, F1, F2 = losses(d)
    U1 = Vars("U1", {"u1": d["u1"]}, lambda s: F1(s.params["u1"], s.L.params["th"]),
              optimizer=RecSGD, optimizer_kwargs=SGD_U1)
    U2 = Vars("U2", {"u2": d["u2"]}, lambda s: F2(s.params["u2"], s.L.params["th"]),
              optimizer=RecSGD, optimizer_kwargs=SGD_U2, config=mlo.ProblemConfig(update_every=2))
    L = Vars("L", {"th": d["th"]}, lambda s: f_L(s.params["th"], s.U1.params["u1"], s.U2.params["u2"]),
             optimizer_kwargs=SGD_L,
             config=mlo.ProblemConfig(unroll_steps=K, method=method, method_options=dict(options or {})))
    U1.L, U2.L, L.U1, L.U2 = L, L, U1, U2
    probs = {"U1": U1, "U2": U2, "L": L}
    eng = mlo.Engine([probs[n] for n in order], {"u2l": {U1: [L], U2: [L]}, "l2u": {L: [U1, U2]}})
    return eng, U1, U2, L


def naive_sgd(p, g, buf, lr, momentum=0.0, weight_decay=0.0):
    """torch.optim.SGD's documented update (no dampening, no nesterov), out of place."""
    g = g + weight_decay * p
    buf = g if buf is None else momentum * buf + g
    return p - lr * buf, buf


def naive(d, iterations, u2_sees_updated_u1=False):
    """The documented schedule in one plain autograd graph per window.

    Returns the total gradients U1 and U2 applied, and the final (u1, u2, θ).
    ``u2_sees_updated_u1``: replay L's window with U1's updated u1 before U2
    backpropagates (what a window that did not keep the values it saw would give).
    """
    f_L, F1, F2 = losses(d)
    p1, p2 = (torch.nn.Parameter(d[k].clone()) for k in ("u1", "u2"))
    o1, o2 = torch.optim.SGD([p1], **SGD_U1), torch.optim.SGD([p2], **SGD_U2)
    u1, u2 = p1.detach().clone().requires_grad_(), p2.detach().clone().requires_grad_()
    th, buf = d["th"].clone().requires_grad_(), None
    start = (th, buf)
    g1s, g2s, ready2 = [], [], 0
    for it in range(1, iterations + 1):
        g, = torch.autograd.grad(f_L(th, u1, u2), th, create_graph=True)
        th, buf = naive_sgd(th, g, buf, **SGD_L)
        if it % K:
            continue
        g1, = torch.autograd.grad(F1(u1, th), u1, retain_graph=True)     # only U1's reads
        g1s.append(g1)
        p1.grad = g1
        o1.step()
        ready2 += 1
        if ready2 % 2 == 0:
            th2 = th
            if u2_sees_updated_u1:                   # replay the window with the new u1
                th2, b2 = start
                for _ in range(K):
                    g, = torch.autograd.grad(f_L(th2, p1.detach(), u2), th2, create_graph=True)
                    th2, b2 = naive_sgd(th2, g, b2, **SGD_L)
            g2, = torch.autograd.grad(F2(u2, th2), u2)
            g2s.append(g2)
            p2.grad = g2
            o2.step()
        u1, u2 = p1.detach().clone().requires_grad_(), p2.detach().clone().requires_grad_()
        th, buf = th.detach().requires_grad_(), buf.detach()   # both tops consumed L's window
        start = (th, buf)
    return g1s, g2s, (p1.detach(), p2.detach(), th.detach())


def test_paths_and_schedule():
    d = data()
    eng, U1, U2, L = build(d)
    assert eng.graph.paths("U1") == [("U1", "L", "U1")]
    assert eng.graph.paths("U2") == [("U2", "L", "U2")]
    assert eng.graph.paths("L") == []
    assert eng.graph.order == ["L", "U1", "U2"]
    for it in range(1, N + 1):
        eng.step()
        assert (L.step_count, U1.step_count, U1.ready_count, U2.ready_count, U2.step_count) == \
            (it, it // K, it // K, it // K, it // (2 * K))
        assert ("L" in eng.open_windows()) == (it % K != 0)    # both readinesses close the window


def test_unrolled_shared_lower_matches_naive(measured):
    d = data()
    eng, U1, U2, L = build(d)
    eng.run(N)
    g1s, g2s, (u1, u2, th) = naive(d, N)
    assert len(U1.optimizer.record) == len(g1s) == 4 and len(U2.optimizer.record) == len(g2s) == 2
    e1 = max(rel(a, b) for a, b in zip(U1.optimizer.record, g1s))
    e2 = max(rel(a, b) for a, b in zip(U2.optimizer.record, g2s))
    es = max(rel(U1.module.u1.detach(), u1), rel(U2.module.u2.detach(), u2), rel(L.module.th.detach(), th))
    measured("two tops share an unrolled lower: U1's gradients vs naive autograd", e1, 1e-12)
    measured("two tops share an unrolled lower: U2's gradients (after U1's in-place step) vs naive",
             e2, 1e-12)
    measured("two tops share an unrolled lower: final states vs naive", es, 1e-12)
    # sensitivity: a window replayed with U1's *updated* u1 gives U2 a visibly different gradient
    _, g2_post, _ = naive(d, N, u2_sees_updated_u1=True)
    assert min(rel(a, b) for a, b in zip(g2_post, g2s)) > 1e-3


@pytest.mark.parametrize("order", [("U1", "U2", "L"), ("U2", "L", "U1")])
def test_each_top_follows_only_its_own_path(order, measured):
    """Mid-window (L took 2 of its 3 steps): ``gradient(U)`` equals ``∂F_U/∂u`` plus the
    backprop of ``∇θF_U`` to L's reads of u only (naive), whatever the problem order."""
    d = data(seed=12)
    eng, U1, U2, L = build(d, order=order)
    eng.run(2)
    f_L, F1, F2 = losses(d)
    u1, u2 = d["u1"].clone().requires_grad_(), d["u2"].clone().requires_grad_()
    th, buf = d["th"].clone().requires_grad_(), None
    for _ in range(2):
        g, = torch.autograd.grad(f_L(th, u1, u2), th, create_graph=True)
        th, buf = naive_sgd(th, g, buf, **SGD_L)
    errs = []
    for name, F, u in (("U1", F1, u1), ("U2", F2, u2)):
        out = eng.gradient(name, by_path=True)
        ref, = torch.autograd.grad(F(u, th), u, retain_graph=True)
        own = torch.autograd.grad(F(u, th.detach()), u)[0]
        key = name.lower()
        assert list(out["paths"]) == [(name, "L", name)]
        errs += [rel(out["grad"][key], ref), rel(out["own"][key], own),
                 rel(out["paths"][(name, "L", name)][key], ref - own)]
    measured("two tops, mid-window gradient(U1/U2) (total, own, path) vs naive", max(errs), 1e-12)


def test_implicit_shared_lower_gauss_seidel(measured):
    """L implicit (CG): L steps in place; each top's VJP is evaluated at the state of the
    moment: U1 at (θ, u1, u2); U2 at (θ, u1⁺, u2), u1⁺ = U1's update of this iteration.
    Reference: ``∂F/∂u − (∂²f_L/∂u∂θ) H⁻¹ ∇θF`` with H and the mixed block from
    ``torch.autograd.functional`` on f_L."""
    d = data(seed=13)
    f_L, F1, F2 = losses(d)
    eng, U1, U2, L = build(d, method="cg", options={"tol": 1e-14})

    def ift(F, u, th, u1, u2, which):
        th = th.clone().requires_grad_()
        u = u.clone().requires_grad_()
        gth, = torch.autograd.grad(F(u, th), th)
        direct, = torch.autograd.grad(F(u, th.detach()), u)
        H = torch.autograd.functional.hessian(lambda t: f_L(t, u1, u2), th.detach())
        if which == 1:
            mixed = torch.autograd.functional.jacobian(
                lambda x: torch.autograd.grad(f_L(th, x, u2), th, create_graph=True)[0], u1)
        else:
            mixed = torch.autograd.functional.jacobian(
                lambda x: torch.autograd.grad(f_L(th, u1, x), th, create_graph=True)[0], u2)
        return direct - mixed.T @ torch.linalg.solve(H, gth)

    errs, gaps = [], []
    for it in range(1, N + 1):
        u1, u2 = U1.module.u1.detach().clone(), U2.module.u2.detach().clone()
        n1, n2 = len(U1.optimizer.record), len(U2.optimizer.record)
        eng.step()
        th, u1p = L.module.th.detach(), U1.module.u1.detach()
        if len(U1.optimizer.record) > n1:
            errs.append(rel(U1.optimizer.record[-1], ift(F1, u1, th, u1, u2, 1)))
        if len(U2.optimizer.record) > n2:
            ref = ift(F2, u2, th, u1p, u2, 2)
            errs.append(rel(U2.optimizer.record[-1], ref))
            gaps.append(rel(ift(F2, u2, th, u1, u2, 2), ref))
    assert eng.counts() == {"U1": 4, "U2": 2, "L": N} and len(gaps) == 2
    measured("two tops share a CG lower: each top's IFT gradient (Gauss-Seidel state) vs autograd",
             max(errs), 1e-10)
    assert min(gaps) > 1e-4          # U1's update of this iteration really changes U2's gradient
