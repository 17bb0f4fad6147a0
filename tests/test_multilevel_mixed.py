"""Unrolled at one level, implicit / finite difference at the other, in a 3-level chain.

Complements ``test_multilevel_middle.py`` (implicit middle over a CG, Neumann or
unrolled bottom with T frozen; static × static with T updating) and
``test_engine_unrolled.py`` (unrolled × unrolled vs naive): here an *unrolled
middle* over a CG / Neumann / finite-difference bottom, a *finite-difference middle*
over an unrolled bottom, and every unrolled × static pair with T really updating.

Chain ``T -u2l-> M -u2l-> B -l2u-> T`` (float64, quadratic levels)::

    M  f_M(μ; λ) = ½ μᵀSμ − μᵀKλ            B  f_B(θ; μ) = ½ θᵀRθ − θᵀBμ
    T  F(λ) = Σ log cosh(Pθ − y) + ρ/2‖λ‖²,   ∇_λ = ρλ + J_Mᵀ J_Bᵀ Pᵀ tanh(Pθ − y)

Each level's best-response Jacobian as its method sees it (state-independent):
CG ``H⁻¹C``; Neumann(K, α) ``α Σ_{k≤K}(I − αH)^k C``; finite difference ``C`` (× lr);
unrolled SGD(η) over a window of k steps ``Σ_{j<k}(I − ηH)^j η C`` — also when the
read problem moves during the window (the Jacobians with respect to each read sum to it).
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import chain_levels, RecSGD, rel, Vars

DT = torch.float64
HUGE = 10 ** 9
RHO = 0.2
LR_M, LR_B = 0.2, 0.25


def chain_data(seed=41, nl=3, nm=4, nb=5, no=6):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731

    def spd(n, lo):
        X = r(n, n)
        return X @ X.T / n + lo * torch.eye(n, dtype=DT)

    return dict(S=spd(nm, 0.6), K=r(nm, nl), R=spd(nb, 0.5), B=r(nb, nm), P=r(no, nb) / 2, y=r(no),
                lam=r(nl), mu0=r(nm), th0=r(nb))


def chain_engine(d, mid, bot, unroll_m, unroll_b, lr_t=0.0):
    T = Vars("T", {"lam": d["lam"]},
             lambda s: torch.log(torch.cosh(d["P"] @ s.B.params["th"] - d["y"])).sum()
             + 0.5 * RHO * (s.params["lam"] ** 2).sum(),
             optimizer=RecSGD, optimizer_kwargs={"lr": lr_t, "momentum": 0.5})
    M, B = chain_levels(d, mid, bot, LR_M, LR_B, unroll_m, unroll_b)
    T.B, M.T, B.M = B, T, M
    return mlo.Engine([T, M, B], {"u2l": {T: [M], M: [B]}, "l2u": {B: [T]}})


def jacobian(method, H, C, lr, window=0):
    name, o = method
    I = torch.eye(H.shape[0], dtype=DT)
    if name == "cg":
        return torch.linalg.solve(H, C)
    if name == "neumann":
        a = o["alpha"]
        return a * sum(torch.linalg.matrix_power(I - a * H, k) for k in range(o["iterations"] + 1)) @ C
    if name == "finite_difference":
        return (lr if o.get("scale_by_lr") else 1.0) * C
    assert name == "unrolled" and window > 0
    return sum(torch.linalg.matrix_power(I - lr * H, j) for j in range(window)) @ (lr * C)


def expected(d, mid, bot, th, lam, wm=0, wb=0):
    JM = jacobian(mid, d["S"], d["K"], LR_M, wm)
    JB = jacobian(bot, d["R"], d["B"], LR_B, wb)
    return RHO * lam + JM.T @ (JB.T @ (d["P"].T @ torch.tanh(d["P"] @ th - d["y"])))


CG = ("cg", {"max_iter": 5, "tol": 0.0})     # exact for the 5×5 R, 4×4 S
NEU = ("neumann", {"iterations": 3, "alpha": 0.6})
FD = ("finite_difference", {"epsilon": 0.03})
FD_LR = ("finite_difference", {"epsilon": 0.01, "scale_by_lr": True})
UNR = ("unrolled", {})


@pytest.mark.parametrize("mid,bot", [(UNR, CG), (UNR, NEU), (UNR, FD_LR), (FD, UNR), (FD_LR, UNR)])
def test_unrolled_and_static_levels_t_frozen(mid, bot, measured):
    """T frozen. Unrolled M: B is implicit and steps every iteration, M after each B step
    (its window holds all k steps; T never ready). Unrolled B: M and T never ready, B's
    window holds k steps. ``gradient("T")`` vs ``ρλ + J_Mᵀ J_Bᵀ Pᵀ tanh r``."""
    d = chain_data()
    k = 5
    unroll_m, unroll_b = (HUGE, 1) if mid[0] == "unrolled" else (1, HUGE)
    eng = chain_engine(d, mid, bot, unroll_m, unroll_b)
    eng.run(k)
    M, B = eng.problems["M"], eng.problems["B"]
    assert (M.step_count, B.step_count) == ((k, k) if mid[0] == "unrolled" else (0, k))
    out = eng.gradient("T", by_path=True)
    eng.close_windows()
    wm, wb = (k, 0) if mid[0] == "unrolled" else (0, k)
    exp = expected(d, mid, bot, B.module.th.detach(), d["lam"], wm, wb)
    err = max(rel(out["grad"]["lam"], exp), rel(out["paths"][("T", "M", "B", "T")]["lam"], exp - RHO * d["lam"]))
    measured("chain, T frozen: unrolled x CG/Neumann/FD (middle, bottom) vs closed form", err, 1e-11)
    # the window length matters: one step fewer is visibly different
    wrong = expected(d, mid, bot, B.module.th.detach(), d["lam"], max(wm - 1, 0), max(wb - 1, 0))
    assert rel(wrong, exp) > 1e-3


@pytest.mark.parametrize("mid,bot", [(UNR, CG), (UNR, NEU), (UNR, FD_LR),
                                     (CG, UNR), (NEU, UNR), (FD, UNR)])
def test_unrolled_and_static_levels_scheduled(mid, bot, measured):
    """T updates (lr 0.1): B unroll 1, M unroll 2 — B steps every iteration, M after each
    B step, T after every 2nd M step. An unrolled M's window is consumed by T: 2 steps.
    An unrolled B's window is consumed only by T (M has no path): 2 steps, reading two
    different M iterates (M steps in place in between). Every gradient T applies equals
    ``ρλ + J_Mᵀ J_Bᵀ Pᵀ tanh r`` at the iterates it read."""
    d = chain_data(seed=42)
    eng = chain_engine(d, mid, bot, unroll_m=2, unroll_b=1, lr_t=0.1)
    T, B = eng.problems["T"], eng.problems["B"]
    wm, wb = (2, 0) if mid[0] == "unrolled" else (0, 2)
    errs = []
    for it in range(1, 9):
        lam = T.module.lam.detach().clone()
        eng.step()
        if it % 2 == 0:
            assert not eng.open_windows()          # T's readiness closed every window
            errs.append(rel(T.optimizer.record[-1], expected(d, mid, bot, B.module.th.detach(), lam, wm, wb)))
    assert eng.counts() == {"T": 4, "M": 8, "B": 8} and len(errs) == 4
    measured("chain, T updating: unrolled x CG/Neumann/FD (middle, bottom) vs closed form", max(errs), 1e-11)
