"""``EngineConfig(nesting="exact")``: the total derivative through nested unrolled windows.

Three levels, float64. The top ``T`` (``λ``) reads the middle ``M`` (``μ``) only; ``M``
reads the bottom ``B`` (``θ``) only; ``B`` reads both::

    B:  f_B(θ; μ, λ) = ½‖θ − Aμ − λ‖²                     θ*(μ, λ) = Aμ + λ
    M:  f_M(μ; θ)    = ½‖θ − c‖² + ½ρ‖μ‖²                 μ*(λ) = (AᵀA + ρI)⁻¹ Aᵀ(c − λ)
    T:  F_T(μ)       = ½‖μ − m‖²

``M`` couples to ``T`` only through ``B``'s best response, so

    dF_T/dλ = (dμ*/dλ)ᵀ (μ* − m) = −A (AᵀA + ρI)⁻¹ (μ* − m).

* Betty's convention (the default) differentiates ``M``'s best response with ``B`` held
  fixed: ``T``'s hypergradient is exactly 0 (docs/design.md#nesting).
* Exact nesting equals an independent plain-autograd nested unroll (K_B steps of ``B``
  inside each of the K_M steps of ``M``, ``M``'s gradient taken w.r.t. its current
  iterate), and converges to the closed form as K grows (geometrically; rate measured).
"""
from __future__ import annotations

import math

import pytest
import torch

import mlo
from _helpers import Vars, rel

DT = torch.float64
D = 4
RHO = 0.3
ETA_B, ETA_M = 0.7, 0.4


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(D, dtype=DT) + 0.3 * torch.randn(D, D, generator=g, dtype=DT)
    return dict(A=A, c=torch.randn(D, generator=g, dtype=DT), m=torch.randn(D, generator=g, dtype=DT),
                lam=torch.randn(D, generator=g, dtype=DT), mu=torch.randn(D, generator=g, dtype=DT),
                th=torch.randn(D, generator=g, dtype=DT))


def f_B(P, th, mu, lam):
    return 0.5 * ((th - P["A"] @ mu - lam) ** 2).sum()


def f_M(P, mu, th):
    return 0.5 * ((th - P["c"]) ** 2).sum() + 0.5 * RHO * (mu ** 2).sum()


def F_T(P, mu):
    return 0.5 * ((mu - P["m"]) ** 2).sum()


def engine(P, KB, KM, nesting="exact", lr_T=0.05, mid=("unrolled", {})):
    T = Vars("T", {"lam": P["lam"]}, lambda s: F_T(P, s.M.params["mu"]) + 0 * s.params["lam"].sum(),
             optimizer_kwargs={"lr": lr_T})
    M = Vars("M", {"mu": P["mu"]}, lambda s: f_M(P, s.params["mu"], s.B.params["th"]),
             optimizer_kwargs={"lr": ETA_M},
             config=mlo.ProblemConfig(unroll_steps=KM, method=mid[0], method_options=dict(mid[1])))
    B = Vars("B", {"th": P["th"]}, lambda s: f_B(P, s.params["th"], s.M.params["mu"], s.T.params["lam"]),
             optimizer_kwargs={"lr": ETA_B}, config=mlo.ProblemConfig(unroll_steps=KB, method="unrolled"))
    T.M, M.B, B.T, B.M = M, B, T, M
    eng = mlo.Engine([B, M, T], {"u2l": {T: [B], M: [B]}, "l2u": {B: [M], M: [T]}},
                     mlo.EngineConfig(nesting=nesting))
    return eng, T, M, B


def naive_outer(P, lam, mu, th, KB, KM):
    """One outer step by plain autograd: ``(dF_T/dλ, μ_K, θ_end)`` from the given state."""
    lam = lam.clone().requires_grad_()
    mu, th = mu.clone().requires_grad_(), th.clone().requires_grad_()
    for _ in range(KM):
        for _ in range(KB):
            # B's step: the partial derivative at fixed μ — μ depends on earlier θ through
            # M's steps, so differentiate w.r.t. a fresh view of θ, not θ itself
            view = th.view_as(th)
            (g,) = torch.autograd.grad(f_B(P, view, mu, lam), view, create_graph=True)
            th = th - ETA_B * g
        (g,) = torch.autograd.grad(f_M(P, mu, th), mu, create_graph=True)   # through B's steps
        mu = mu - ETA_M * g
    (h,) = torch.autograd.grad(F_T(P, mu), lam)
    return h, mu.detach(), th.detach()


def closed_form(P, lam):
    A = P["A"]
    H = A.T @ A + RHO * torch.eye(D, dtype=DT)
    mu_star = torch.linalg.solve(H, A.T @ (P["c"] - lam))
    return -A @ torch.linalg.solve(H, mu_star - P["m"])


@pytest.mark.parametrize("KB,KM", [(1, 1), (2, 3), (3, 2)])
def test_exact_equals_a_plain_autograd_nested_unroll(KB, KM, measured):
    """Three consecutive top updates (λ, μ and θ move; windows reopen from the written-back state)."""
    P = data(1)
    eng, T, M, B = engine(P, KB, KM)
    lam, mu, th = P["lam"].clone(), P["mu"].clone(), P["th"].clone()
    errs, lr_T = [], 0.05
    for _ in range(3):
        want, mu, th = naive_outer(P, lam, mu, th, KB, KM)
        eng.run(KB * KM)
        got = eng.last_hypergradient["T"]["lam"]
        errs.append(rel(got, want))
        assert not eng.open_windows()                       # the top consumed the nest
        assert rel(M.module.mu.detach(), mu) < 1e-13 and rel(B.module.th.detach(), th) < 1e-13
        lam = lam - lr_T * want                             # T's direct term is 0 here
        assert rel(T.module.lam.detach(), lam) < 1e-12
    assert eng.counts() == {"B": 3 * KB * KM, "M": 3 * KM, "T": 3}
    measured(f"exact nesting vs plain-autograd nested unroll (K_B={KB}, K_M={KM}, 3 top updates)",
             max(errs), 1e-12)


def test_default_convention_gives_exactly_zero():
    """Betty's convention: M's best response is taken with B fixed, so T sees nothing."""
    P = data(2)
    for KB, KM in [(1, 1), (3, 2), (20, 20)]:
        eng, *_ = engine(P, KB, KM, nesting="betty")
        eng.run(KB * KM)
        assert torch.count_nonzero(eng.last_hypergradient["T"]["lam"]) == 0
        want, *_ = naive_outer(P, P["lam"], P["mu"], P["th"], KB, KM)
        assert want.abs().max() > 1e-3          # the exact value is not zero: the test discriminates


def test_exact_converges_to_the_closed_form_geometrically(measured):
    """First top update from the same start with K = K_B = K_M growing; λ at its start."""
    P = data(3)
    want = closed_form(P, P["lam"])
    ks, errs = [4, 8, 16, 32], []
    for K in ks:
        eng, *_ = engine(P, K, K, lr_T=0.0)
        eng.run(K * K)
        errs.append(rel(eng.last_hypergradient["T"]["lam"], want))
    # error ≈ C·q^K: each doubling of K squares the contraction factor
    rates = [(math.log(errs[i + 1]) - math.log(errs[i])) / (ks[i + 1] - ks[i]) for i in range(len(ks) - 1)]
    q = math.exp(rates[-1])
    assert all(errs[i + 1] < errs[i] for i in range(len(errs) - 1)), errs
    A = P["A"]
    H = A.T @ A + RHO * torch.eye(D, dtype=DT)
    q_M = float((1 - ETA_M * torch.linalg.eigvalsh(H)).abs().max())    # M's outer contraction
    measured(f"exact nesting vs closed form, K=K_B=K_M=32 (errors at K=4,8,16,32: "
             f"{', '.join(f'{e:.1e}' for e in errs)}; per-step rate q={q:.3f}, M's contraction "
             f"|1-η_M·eig(AᵀA+ρI)|max={q_M:.3f})", errs[-1], 5e-4)
    measured("exact nesting: measured convergence rate q vs M's contraction q_M (|q - q_M|)",
             abs(q - q_M), 0.02)          # the error shrinks like q_M^K: M's outer iteration


def test_exact_refuses_what_it_cannot_differentiate():
    P = data(4)
    for mid in [("cg", {"max_iter": 5}), ("neumann", {}), ("finite_difference", {})]:
        with pytest.raises(mlo.GraphError, match=r"problem 'M'.*nesting='exact'.*method='unrolled'"):
            engine(P, 2, 2, mid=mid)
    eng, *_ = engine(P, 2, 2)
    with pytest.raises(ValueError, match="by_path"):
        eng.gradient("T", by_path=True)
    with pytest.raises(ValueError, match="nesting must be 'betty' or 'exact'"):
        mlo.EngineConfig(nesting="total")
    # two tops: nobody consumes the nest
    a = Vars("a", {"x": torch.zeros(1, dtype=DT)}, lambda s: (s.params["x"] - s.c.params["z"]).pow(2).sum())
    b = Vars("b", {"y": torch.zeros(1, dtype=DT)}, lambda s: (s.params["y"] - s.c.params["z"]).pow(2).sum())
    c = Vars("c", {"z": torch.zeros(1, dtype=DT)}, lambda s: (s.params["z"] - s.a.params["x"]).pow(2).sum())
    a.c, b.c, c.a = c, c, a
    with pytest.raises(mlo.GraphError, match="single top"):
        mlo.Engine([c, a, b], {"u2l": {a: [c]}, "l2u": {c: [a, b]}}, mlo.EngineConfig(nesting="exact"))


def test_gradient_query_keeps_the_run_exact(measured):
    """engine.gradient("T") inside the nest leaves the graph for the top's own update."""
    P = data(5)
    eng, *_ = engine(P, 2, 2)
    eng.run(3)          # B: 3 steps, M: 1 step, the nest is open
    peek = eng.gradient("T")["hyper"]["lam"]
    eng.run(1)
    want, *_ = naive_outer(P, P["lam"], P["mu"], P["th"], 2, 2)
    measured("exact nesting: applied hypergradient after an engine.gradient query vs naive",
             rel(eng.last_hypergradient["T"]["lam"], want), 1e-12)
    assert torch.isfinite(peek).all()


def test_fused_two_level_top_equals_the_path_sum(measured):
    """Two unrolled lowers under one top: the top's single fused backward (default) equals
    the sum over its paths computed by cotangent hand-over (by_path)."""
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(6, D, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    T = Vars("T", {"lam": torch.rand(D, generator=g, dtype=DT)},
             lambda s: ((X @ s.L1.params["w"] - y) ** 2).sum() + ((X @ s.L2.params["v"] + y) ** 2).sum())
    L1 = Vars("L1", {"w": torch.randn(D, generator=g, dtype=DT)},
              lambda s: ((X @ s.params["w"] - y) ** 2).sum() + (s.T.params["lam"] * s.params["w"] ** 2).sum(),
              optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05},
              config=mlo.ProblemConfig(unroll_steps=3, method="unrolled"))
    L2 = Vars("L2", {"v": torch.randn(D, generator=g, dtype=DT)},
              lambda s: ((X @ s.params["v"]) ** 2).sum() + (s.T.params["lam"].exp() * s.params["v"] ** 2).sum(),
              optimizer_kwargs={"lr": 0.02, "momentum": 0.5}, config=mlo.ProblemConfig(unroll_steps=3, method="unrolled"))
    T.L1, T.L2, L1.T, L2.T = L1, L2, T, T
    eng = mlo.Engine([L1, L2, T], {"u2l": {T: [L1, L2]}, "l2u": {L1: [T], L2: [T]}})
    eng.run(2)       # both windows open, two steps in
    fused = eng.gradient("T")
    split = eng.gradient("T", by_path=True)
    total = sum(p["lam"] for p in split["paths"].values())
    measured("fused top backward vs Σ per-path cotangent hand-over (two unrolled lowers)",
             max(rel(fused["hyper"]["lam"], total), rel(fused["hyper"]["lam"], split["hyper"]["lam"])), 1e-13)


def test_exact_changes_derivatives_not_the_forward_run(measured):
    """Within one top window the iterates of M and B are the same numbers in both modes
    (only what is differentiated changes) — the bottom's step is its partial derivative at
    fixed μ even though μ's live iterate depends on earlier θ. Differentiating B's loss
    w.r.t. θ itself (through μ) would change the run: the check discriminates."""
    P = data(6)
    KB, KM = 3, 3
    runs = {}
    for nesting in ("betty", "exact"):
        eng, T, M, B = engine(P, KB, KM, nesting=nesting, lr_T=0.0)
        eng.run(KB * KM)
        runs[nesting] = (M.module.mu.detach().clone(), B.module.th.detach().clone())
    err = max(rel(a, b) for a, b in zip(runs["betty"], runs["exact"]))
    measured("exact vs betty nesting: M and B iterates after one top window (same forward run)", err, 1e-14)
    # the flawed alternative: ∇θ f_B taken through μ's dependence on earlier θ
    lam, mu, th = P["lam"].clone(), P["mu"].clone().requires_grad_(), P["th"].clone().requires_grad_()
    for _ in range(KM):
        for _ in range(KB):
            (g,) = torch.autograd.grad(f_B(P, th, mu, lam), th, create_graph=True)
            th = th - ETA_B * g
        (g,) = torch.autograd.grad(f_M(P, mu, th), mu, create_graph=True)
        mu = mu - ETA_M * g
    assert rel(th.detach(), runs["exact"][1]) > 1e-6


def test_nesting_example_runs():
    """``examples/nesting.py`` (the command line over :mod:`problems.nesting`), run as a script."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "nesting.py"
    proc = subprocess.run([sys.executable, str(script), "--ks", "2,4"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "closed form" in out and "K=  4  betty: ‖h‖ = 0 " in out
