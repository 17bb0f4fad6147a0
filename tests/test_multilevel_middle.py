"""Implicit methods at the MIDDLE level of a three-level chain (float64, closed forms).

A pure chain ``T -u2l-> M -u2l-> B -l2u-> T`` with non-identity Hessians::

    M  μ*(λ) = argmin_μ ½ μᵀSμ − μᵀKλ  = S⁻¹Kλ                      (reads T)
    B  θ*(μ) = argmin_θ ½ θᵀRθ − θᵀBμ  = R⁻¹Bμ                      (reads M)
    T  F(λ)  = ½‖Pθ − t‖²,   ∇_λ F = J_Mᵀ J_Bᵀ Pᵀ r,  r = Pθ − t    (reads B)

The only path of ``T`` is ``(T, M, B, T)``, so ``M``'s best-response VJP sits in
the middle of it (the reference library asserts against an implicit method there).
Both levels are quadratic, so every method's Jacobian is a known matrix,
independent of the iterate:

* CG: ``J = S⁻¹K`` (resp. ``R⁻¹B``);
* Neumann(K, α): ``J = N_K(S) K`` with ``N_K(S) = α Σ_{k≤K} (I − αS)^k``;
* finite difference (``H⁻¹ ≈ I``, optionally × lr): ``J = K`` (× lr);
* unrolled SGD(η), K steps with μ fixed: ``J = Σ_{j<K} (I − ηR)^j ηB``.
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import chain_levels, RecSGD, rel, Vars

DT = torch.float64
HUGE = 10 ** 9  # unroll_steps that keep a problem's upper from ever becoming ready


def chain_data(seed=7, nl=3, nm=4, nb=5, no=6):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731

    def spd(n, lo):
        X = r(n, n)
        return X @ X.T / n + lo * torch.eye(n, dtype=DT)

    return dict(S=spd(nm, 0.5), K=r(nm, nl), R=spd(nb, 0.4), B=r(nb, nm), P=r(no, nb), t=r(no),
                lam=r(nl), mu0=r(nm), th0=r(nb))


def chain_engine(d, mid, bot, lr_m=0.2, lr_b=0.2, unroll_m=HUGE, unroll_b=HUGE):
    """T -u2l-> M -u2l-> B -l2u-> T. By default M and B never let their uppers become ready."""
    T = Vars("T", {"lam": d["lam"]},
             lambda s: 0.5 * ((d["P"] @ s.B.params["th"] - d["t"]) ** 2).sum() + 0 * s.params["lam"].sum(),
             optimizer=RecSGD, optimizer_kwargs={"lr": 0.05, "momentum": 0.4})
    M, B = chain_levels(d, mid, bot, lr_m, lr_b, unroll_m, unroll_b)
    T.B, M.T, B.M = B, T, M
    return mlo.Engine([T, M, B], {"u2l": {T: [M], M: [B]}, "l2u": {B: [T]}})


def neumann_matrix(H, K, alpha):
    I = torch.eye(H.shape[0], dtype=DT)
    Mt = I - alpha * H
    return alpha * sum(torch.linalg.matrix_power(Mt, k) for k in range(K + 1))


def jacobian(method, H, C, lr):
    """Best-response Jacobian of ``argmin ½ xᵀHx − xᵀC y`` w.r.t. ``y`` as ``method`` sees it."""
    name, o = method
    if name == "cg":
        return torch.linalg.solve(H, C)
    if name == "neumann":
        return neumann_matrix(H, o["iterations"], o["alpha"]) @ C
    assert name == "finite_difference"
    return (lr if o.get("scale_by_lr") else 1.0) * C


@pytest.mark.parametrize("mid", [("cg", {}), ("neumann", {"iterations": 400, "alpha": 0.5}),
                                 ("neumann", {"iterations": 3, "alpha": 0.7})])
@pytest.mark.parametrize("bot", [("cg", {}), ("neumann", {"iterations": 5, "alpha": 0.3}),
                                 ("unrolled", {})])
def test_chain_implicit_at_middle_level(mid, bot, measured):
    d = chain_data()
    eng = chain_engine(d, mid, bot)
    assert eng.graph.paths("T") == [("T", "M", "B", "T")]
    Kb = 4 if bot[0] == "unrolled" else 0
    eng.run(Kb)                 # B takes Kb steps (in a window if unrolled); M, T stay
    assert eng.problems["M"].step_count == 0 and eng.problems["T"].step_count == 0
    out = eng.gradient("T")
    eng.close_windows()
    th = eng.problems["B"].module.th.detach()
    r = d["P"] @ th - d["t"]
    S, R = d["S"], d["R"]
    JM = jacobian(mid, S, d["K"], 0.2)
    if bot[0] == "unrolled":     # K SGD steps from θ₀ with μ fixed: Σ_{j<K} (I−ηR)^j η B
        I = torch.eye(R.shape[0], dtype=DT)
        JB = sum(torch.linalg.matrix_power(I - 0.2 * R, j) for j in range(Kb)) @ (0.2 * d["B"])
    else:
        JB = jacobian(bot, R, d["B"], 0.2)
    expect = JM.T @ (JB.T @ (d["P"].T @ r))
    # 400 Neumann terms accumulate rounding: 1e-10 there, 1e-12 elsewhere
    tol = 1e-10 if mid == ("neumann", {"iterations": 400, "alpha": 0.5}) else 1e-12
    measured("chain: CG/Neumann at the middle level vs closed form", rel(out["grad"]["lam"], expect), tol)
    if mid[0] == "cg" and bot[0] == "cg":      # the exact chain rule
        exact = torch.linalg.solve(S, d["K"]).T @ torch.linalg.solve(R, d["B"]).T @ d["P"].T @ r
        measured("chain: CG at middle and bottom vs exact chain rule", rel(out["grad"]["lam"], exact), 1e-12)
    if mid == ("neumann", {"iterations": 3, "alpha": 0.7}):   # the truncation is visible
        assert rel(out["grad"]["lam"], torch.linalg.solve(S, d["K"]).T @ (JB.T @ (d["P"].T @ r))) > 1e-3


@pytest.mark.parametrize("mid", [("cg", {"max_iter": 4, "tol": 0.0}),
                                 ("neumann", {"iterations": 3, "alpha": 0.7}),
                                 ("finite_difference", {"scale_by_lr": True, "epsilon": 0.02})])
@pytest.mark.parametrize("bot", [("cg", {}), ("neumann", {"iterations": 5, "alpha": 0.3}),
                                 ("finite_difference", {})])
def test_chain_middle_level_scheduled_updates(mid, bot, measured):
    """The same chain with T really updating: B steps every iteration, M after each
    B step, T after every 2nd M step. Every gradient T applies equals
    ``J_Mᵀ J_Bᵀ Pᵀ r`` at the iterates of that moment (implicit methods are
    evaluated at the current iterate; their Jacobians here are state-independent)."""
    d = chain_data(seed=8)
    lr_m, lr_b = 0.15, 0.25
    eng = chain_engine(d, mid, bot, lr_m=lr_m, lr_b=lr_b, unroll_m=2, unroll_b=1)
    T, B = eng.problems["T"], eng.problems["B"]
    JM, JB = jacobian(mid, d["S"], d["K"], lr_m), jacobian(bot, d["R"], d["B"], lr_b)
    errs = []
    for it in range(1, 9):
        eng.step()
        if it % 2 == 0:          # T updated last in this iteration: B's iterate is the one it read
            r = d["P"] @ B.module.th.detach() - d["t"]
            errs.append(rel(T.optimizer.record[-1], JM.T @ (JB.T @ (d["P"].T @ r))))
    assert eng.counts() == {"T": 4, "M": 8, "B": 8} and len(T.optimizer.record) == 4
    measured("chain: CG/Neumann/FD at the middle level, T updating (4 updates) vs closed form",
             max(errs), 1e-12)


@pytest.mark.parametrize("mid,bot", [
    (("cg", {}), ("cg", {})),
    (("neumann", {"iterations": 3, "alpha": 0.7}), ("neumann", {"iterations": 2, "alpha": 0.4})),
    (("finite_difference", {}), ("cg", {"max_iter": 5, "tol": 0.0})),
    (("cg", {}), ("finite_difference", {"scale_by_lr": True})),
])
def test_middle_level_reading_its_lower_three_paths(mid, bot, measured):
    """M also reads B (``f_M −= μᵀWθ``) and T reads both (``F = ½‖Pθ + Uμ − t‖²``):
    ``l2u = {B: [M, T], M: [T]}`` gives T three paths, M in the middle of two::

        (T, M, T)        J_MTᵀ Uᵀr
        (T, M, B, T)     J_MTᵀ J_BMᵀ Pᵀr
        (T, M, B, M, T)  J_MTᵀ J_BMᵀ J_MBᵀ Uᵀr       J_MT = S⁻¹K, J_MB = S⁻¹W, J_BM = R⁻¹B

    (each J as the level's method sees it)."""
    d = chain_data()
    gen = torch.Generator().manual_seed(3)
    Wm = torch.randn(4, 5, generator=gen, dtype=DT) / 3
    U = torch.randn(6, 4, generator=gen, dtype=DT)
    x = lambda p: p.params[next(iter(p.params))]  # noqa: E731
    T = Vars("T", {"lam": d["lam"]},
             lambda s: 0.5 * ((d["P"] @ x(s.B) + U @ x(s.M) - d["t"]) ** 2).sum() + 0 * x(s).sum())
    M = Vars("M", {"mu": d["mu0"]},
             lambda s: 0.5 * x(s) @ d["S"] @ x(s) - x(s) @ (d["K"] @ x(s.T)) - x(s) @ (Wm @ x(s.B)),
             optimizer_kwargs={"lr": 0.2},
             config=mlo.ProblemConfig(method=mid[0], method_options=dict(mid[1]), unroll_steps=HUGE))
    B = Vars("B", {"th": d["th0"]}, lambda s: 0.5 * x(s) @ d["R"] @ x(s) - x(s) @ (d["B"] @ x(s.M)),
             optimizer_kwargs={"lr": 0.3},
             config=mlo.ProblemConfig(method=bot[0], method_options=dict(bot[1]), unroll_steps=HUGE))
    T.B, T.M, M.T, M.B, B.M = B, M, T, B, M
    eng = mlo.Engine([T, M, B], {"u2l": {T: [M], M: [B]}, "l2u": {B: [M, T], M: [T]}})
    out = eng.gradient("T", by_path=True)
    r = d["P"] @ B.module.th.detach() + U @ M.module.mu.detach() - d["t"]
    JMT, JMB = jacobian(mid, d["S"], d["K"], 0.2), jacobian(mid, d["S"], Wm, 0.2)
    JBM = jacobian(bot, d["R"], d["B"], 0.3)
    expect = {("T", "M", "T"): JMT.T @ (U.T @ r),
              ("T", "M", "B", "T"): JMT.T @ (JBM.T @ (d["P"].T @ r)),
              ("T", "M", "B", "M", "T"): JMT.T @ (JBM.T @ (JMB.T @ (U.T @ r)))}
    assert sorted(out["paths"]) == sorted(expect)
    errs = [rel(out["grad"]["lam"], sum(expect.values()))]
    errs += [rel(out["paths"][p]["lam"], e) for p, e in expect.items()]
    measured("middle level reading its lower (3 paths), CG/Neumann/FD vs closed form", max(errs), 1e-12)
