"""Multilevel hypergradients through ``mlo.Engine``: any method at any level.

float64, closed forms (docs/design.md#p4) and naive autograd references.

P4 — MLO-MAE-shaped three levels, two paths into ``mask``::

    pretrain  E*(M) = argmin_E ½‖E − A M‖² + a/2‖E‖²  = A M / (1+a)      (reads mask)
    finetune  C*(E) = argmin_C ½‖C − F E‖² + c/2‖C‖²  = F E / (1+c)      (reads pretrain)
    mask      L(M)  = ½‖G E* + Q C* − t‖²                               (reads both)

    u2l = {mask: [pretrain]}, l2u = {pretrain: [finetune, mask], finetune: [mask]}
    paths of mask: (mask, pretrain, mask)            term (A/(1+a))ᵀ Gᵀ r
                   (mask, pretrain, finetune, mask)  term (A/(1+a))ᵀ (QF/(1+c))ᵀ r
    ∇_M L = (A/(1+a))ᵀ (G + QF/(1+c))ᵀ r,  r = G E + Q C − t.

The per-level Hessians are ``(1+a)I`` and ``(1+c)I``. Every best-response VJP of a
quadratic level is linear and independent of the iterate, so each method has an
exact prediction:

* CG: ``Aᵀv/(1+a)`` (one iteration suffices).
* Neumann(K, α): ``s·Aᵀv`` with ``s = α Σ_{k≤K} (1 − α(1+a))^k`` (α honored, any K).
* finite difference (H⁻¹ ≈ I, optionally × lr): ``Aᵀv`` (× lr), exact up to
  rounding because the gradient is linear in the perturbation.
* unrolled SGD(η) for K steps: compared with an independent naive autograd
  implementation of the same schedule, and, for large K, with the optimum.

The middle-level chain ``T → M → B`` lives in ``test_multilevel_middle.py``.
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import RecSGD, rel, Vars

DT = torch.float64
HUGE = 10 ** 9  # unroll_steps that keep a problem's upper from ever becoming ready


# ------------------------------------------------------------------------- P4
def p4_data(seed=0, m=4, e=5, c=3, o=6, a=0.5, cc=0.3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    d = dict(A=r(e, m), F=r(c, e) / 2, G=r(o, e) / 2, Q=r(o, c), t=r(o), M=r(m), a=a, c=cc)
    d["E0"], d["C0"] = r(e), r(c)                       # a non-optimal start
    return d


def p4_optimum(d, M=None):
    M = d["M"] if M is None else M
    E = d["A"] @ M / (1 + d["a"])
    C = d["F"] @ E / (1 + d["c"])
    return E, C


def p4_terms(d, E, C):
    """Closed-form per-path terms at (E, C) (both VJPs exact)."""
    r = d["G"] @ E + d["Q"] @ C - d["t"]
    JA = d["A"] / (1 + d["a"])
    t1 = JA.T @ (d["G"].T @ r)
    t2 = JA.T @ ((d["Q"] @ d["F"] / (1 + d["c"])).T @ r)
    return t1, t2, r


def p4_engine(d, pre=("cg", {}), fin=("cg", {}), E=None, C=None, lr_pre=0.5, lr_fin=0.5,
              pre_unroll=1, fin_unroll=HUGE):
    """Builds P4. By default ``mask`` never becomes ready (finetune's unroll_steps is
    huge): every ``engine.step()`` moves pretrain then finetune one SGD step."""
    E0, C0 = (E, C) if E is not None else p4_optimum(d)
    mask = Vars("mask", {"M": d["M"]},
                lambda s: 0.5 * ((d["G"] @ s.pre.params["E"] + d["Q"] @ s.fin.params["C"] - d["t"]) ** 2).sum(),
                optimizer=RecSGD, optimizer_kwargs={"lr": 0.05, "momentum": 0.5})
    pre = Vars("pretrain", {"E": E0},
               lambda s: 0.5 * ((s.params["E"] - d["A"] @ s.mask.params["M"]) ** 2).sum()
               + 0.5 * d["a"] * (s.params["E"] ** 2).sum(),
               optimizer_kwargs={"lr": lr_pre},
               config=mlo.ProblemConfig(method=pre[0], method_options=dict(pre[1]), unroll_steps=pre_unroll))
    fin = Vars("finetune", {"C": C0},
               lambda s: 0.5 * ((s.params["C"] - d["F"] @ s.pre.params["E"]) ** 2).sum()
               + 0.5 * d["c"] * (s.params["C"] ** 2).sum(),
               optimizer_kwargs={"lr": lr_fin},
               config=mlo.ProblemConfig(method=fin[0], method_options=dict(fin[1]), unroll_steps=fin_unroll))
    mask.pre, mask.fin, pre.mask, fin.pre = pre, fin, mask, pre
    eng = mlo.Engine([mask, pre, fin], {"u2l": {mask: [pre]},
                                        "l2u": {pre: [fin, mask], fin: [mask]}})
    return eng


P1_PATH = ("mask", "pretrain", "mask")
P2_PATH = ("mask", "pretrain", "finetune", "mask")


def neumann_scale(h, K, alpha):
    """``α Σ_{k≤K} (1 − αh)^k``: Neumann's approximation of ``1/h`` for ``H = hI``."""
    return alpha * sum((1 - alpha * h) ** k for k in range(K + 1))


def test_p4_graph_has_two_paths():
    eng = p4_engine(p4_data())
    assert sorted(eng.graph.paths("mask")) == sorted([P1_PATH, P2_PATH])


@pytest.mark.parametrize("method", [
    ("cg", {}),
    ("cg", {"max_iter": 1, "tol": 0.0}),
    ("neumann", {"iterations": 80, "alpha": 1.0}),     # 1 − α(1+a) = −0.5, −0.3
    ("neumann", {"iterations": 300, "alpha": 0.1}),    # 0.85, 0.87: slow but converges
])
def test_p4_implicit_at_optimum_matches_closed_form(method, measured):
    d = p4_data()
    eng = p4_engine(d, pre=method, fin=method)
    E, C = p4_optimum(d)
    t1, t2, _ = p4_terms(d, E, C)
    out = eng.gradient("mask", by_path=True)
    total = t1 + t2
    err = rel(out["grad"]["M"], total)
    e1, e2 = rel(out["paths"][P1_PATH]["M"], t1), rel(out["paths"][P2_PATH]["M"], t2)
    esum = rel(out["paths"][P1_PATH]["M"] + out["paths"][P2_PATH]["M"], out["grad"]["M"])
    measured("P4 CG / converged Neumann at optimum vs closed form (total, each path)",
             max(err, e1, e2), 1e-6)
    measured("P4 per-path terms sum to the total", esum, 1e-12)
    assert torch.equal(out["own"]["M"], torch.zeros_like(d["M"]))  # L reads M only via paths


@pytest.mark.parametrize("scale_by_lr", [False, True])
def test_p4_finite_difference_is_identity_hessian_formula(scale_by_lr, measured):
    d = p4_data(seed=1)
    lp, lf = 0.4, 0.7
    opts = {"epsilon": 0.004, "scale_by_lr": scale_by_lr}
    eng = p4_engine(d, pre=("finite_difference", opts), fin=("darts", opts), lr_pre=lp, lr_fin=lf)
    E, C = p4_optimum(d)
    r = d["G"] @ E + d["Q"] @ C - d["t"]
    sp, sf = (lp, lf) if scale_by_lr else (1.0, 1.0)
    t1 = sp * d["A"].T @ (d["G"].T @ r)                       # H⁻¹ ≈ I (× lr) at each level
    t2 = sp * d["A"].T @ (sf * (d["Q"] @ d["F"]).T @ r)
    out = eng.gradient("mask", by_path=True)
    errs = (rel(out["grad"]["M"], t1 + t2), rel(out["paths"][P1_PATH]["M"], t1),
            rel(out["paths"][P2_PATH]["M"], t2))
    measured("P4 finite difference vs identity-Hessian formula (total, each path)", max(errs), 1e-8)


# --- mixed methods (implicit pretrain / other finetune and vice versa) -----------
@pytest.mark.parametrize("pre,fin", [
    (("cg", {"max_iter": 3, "tol": 1e-13}), ("neumann", {"iterations": 3, "alpha": 0.6})),
    (("neumann", {"iterations": 4, "alpha": 0.3}), ("cg", {"tol": 1e-12})),
    (("finite_difference", {"epsilon": 0.05}), ("cg", {"max_iter": 2, "tol": 0.0})),
    (("cg", {"damping": 0.0, "tol": 1e-13}), ("finite_difference", {"scale_by_lr": True, "epsilon": 0.002})),
    (("neumann", {"iterations": 2, "alpha": 0.9}), ("finite_difference", {"epsilon": 0.03})),
])
def test_p4_mixed_static_methods(pre, fin, measured):
    """Each level's VJP is ``s_level ·`` (exact coupling); the scales multiply along a path."""
    d = p4_data(seed=2)
    lp, lf = 0.5, 0.25

    def scale(method, h, lr):
        name, o = method
        if name == "cg":
            return 1.0 / h
        if name == "neumann":
            return neumann_scale(h, o["iterations"], o["alpha"])
        return lr if o.get("scale_by_lr") else 1.0            # finite difference: H⁻¹ ≈ I

    eng = p4_engine(d, pre=pre, fin=fin, lr_pre=lp, lr_fin=lf)
    E, C = p4_optimum(d)
    r = d["G"] @ E + d["Q"] @ C - d["t"]
    sp, sf = scale(pre, 1 + d["a"], lp), scale(fin, 1 + d["c"], lf)
    t1 = sp * d["A"].T @ (d["G"].T @ r)
    t2 = sp * d["A"].T @ (sf * (d["Q"] @ d["F"]).T @ r)
    out = eng.gradient("mask", by_path=True)
    errs = (rel(out["grad"]["M"], t1 + t2), rel(out["paths"][P1_PATH]["M"], t1),
            rel(out["paths"][P2_PATH]["M"], t2))
    measured("P4 mixed CG/Neumann/FD per level vs closed form (total, each path)", max(errs), 1e-8)
    # truncated Neumann really differs from the exact answer (α and K matter)
    if "neumann" in (pre[0], fin[0]):
        assert rel(out["grad"]["M"], sum(p4_terms(d, E, C)[:2])) > 1e-3


# --- unrolled: naive autograd reference of the engine's schedule -----------------
def p4_naive(d, K, lp, lf, pre_unrolled: bool, fin_unrolled: bool, fin_vjp_scale=None):
    """Independent implementation. Iteration k: E ← E − η_p ∇_E f_pre(E, M), then
    C ← C − η_f ∇_C f_ft(C, E_new) (plain SGD, ∇ written by hand). Whatever is
    unrolled keeps the graph from M; an implicit finetune contributes
    ``fin_vjp_scale · Fᵀ v`` at the current state (quadratic: state-independent).
    Returns (∇_M L, E_K, C_K)."""
    A, F, G, Q, t, a, c = (d[k] for k in "AFGQtac")
    M = d["M"].clone().requires_grad_()
    E, C = d["E0"].clone(), d["C0"].clone()
    for _ in range(K):
        E = E - lp * ((E - A @ M) + a * E)
        if not pre_unrolled:
            E = E.detach()
        C = C - lf * ((C - F @ E) + c * C)
        if not fin_unrolled:
            C = C.detach()
    r = (G @ E + Q @ C - t).detach()
    vE = G.T @ r
    if fin_unrolled:
        vC = Q.T @ r
        (g,) = torch.autograd.grad((E * vE).sum() + (C * vC).sum(), M, allow_unused=True)
    else:
        vE = vE + fin_vjp_scale * F.T @ (Q.T @ r)
        (g,) = torch.autograd.grad((E * vE).sum(), M)
    return g, E.detach(), C.detach()


@pytest.mark.parametrize("K", [1, 3, 7])
def test_p4_both_unrolled_matches_naive_autograd(K, measured):
    d = p4_data(seed=3)
    lp, lf = 0.3, 0.45
    eng = p4_engine(d, pre=("unrolled", {}), fin=("unrolled", {}), E=d["E0"], C=d["C0"],
                    lr_pre=lp, lr_fin=lf)
    eng.run(K)
    out = eng.gradient("mask", by_path=True)
    ref, E, C = p4_naive(d, K, lp, lf, True, True)
    err = rel(out["grad"]["M"], ref)
    esum = rel(sum(v["M"] for v in out["paths"].values()), out["grad"]["M"])
    eng.close_windows()
    measured("P4 unrolled iterates vs naive autograd",
             max(rel(eng.problems["pretrain"].module.E.detach(), E),
                 rel(eng.problems["finetune"].module.C.detach(), C)), 1e-13)
    measured("P4 both unrolled K∈{1,3,7} vs naive autograd", err, 1e-12)
    measured("P4 per-path terms sum to the total", esum, 1e-12)


def test_p4_unrolled_many_steps_tends_to_closed_form(measured):
    """From a non-optimal start, K unrolled SGD steps at both lowers → closed form.

    With η(1+a), η(1+c) < 2 the iterates and their Jacobians converge geometrically
    (factors ρ_a = |1 − η(1+a)|, ρ_c = |1 − η(1+c)|); the error after K steps is
    O(K·max(ρ)^K). Here ρ = max(0.55, 0.61): K·ρ^K ≈ 8e-12 at K=60 (measured error
    7e-13) and 3e-20 at K=100, where only rounding is left (measured ~1e-15).
    Tolerance 1e-12 at K=100: rounding of ~100 SGD steps and the two backward passes
    in float64 plus the (negligible) truncation term."""
    d = p4_data(seed=4)
    lp = lf = 0.3                                           # ρ_a = 0.55, ρ_c = 0.61
    K = 100
    eng = p4_engine(d, pre=("unrolled", {}), fin=("unrolled", {}), E=d["E0"], C=d["C0"],
                    lr_pre=lp, lr_fin=lf)
    eng.run(K)
    out = eng.gradient("mask", by_path=True)
    E, C = p4_optimum(d)
    t1, t2, _ = p4_terms(d, E, C)
    errs = (rel(out["grad"]["M"], t1 + t2), rel(out["paths"][P1_PATH]["M"], t1),
            rel(out["paths"][P2_PATH]["M"], t2))
    # the same engine after only 5 steps is far off: convergence is what is tested
    eng5 = p4_engine(d, pre=("unrolled", {}), fin=("unrolled", {}), E=d["E0"], C=d["C0"],
                     lr_pre=lp, lr_fin=lf)
    eng5.run(5)
    e5 = rel(eng5.gradient("mask")["grad"]["M"], t1 + t2)
    rho = max(abs(1 - lp * (1 + d["a"])), abs(1 - lf * (1 + d["c"])))
    assert K * rho ** K < 1e-15                              # the truncation term is gone
    measured("P4 both unrolled K=100 vs closed form (total, each path)", max(errs), 1e-12)
    assert e5 > 1e-3


@pytest.mark.parametrize("fin", [("cg", {"max_iter": 2, "tol": 1e-13}), ("neumann", {"iterations": 3, "alpha": 0.5}),
                                 ("finite_difference", {"epsilon": 0.04})])
def test_p4_pretrain_unrolled_finetune_static(fin, measured):
    """pretrain unrolled (window through K steps), finetune CG/Neumann/FD at its iterate."""
    d = p4_data(seed=5)
    lp, lf, K = 0.35, 0.2, 6
    eng = p4_engine(d, pre=("unrolled", {}), fin=fin, E=d["E0"], C=d["C0"], lr_pre=lp, lr_fin=lf)
    eng.run(K)
    h = 1 + d["c"]
    s = {"cg": 1 / h, "finite_difference": 1.0}.get(fin[0])
    if fin[0] == "neumann":
        s = neumann_scale(h, fin[1]["iterations"], fin[1]["alpha"])
    out = eng.gradient("mask", by_path=True)
    ref, E, C = p4_naive(d, K, lp, lf, True, False, fin_vjp_scale=s)
    err = rel(out["grad"]["M"], ref)
    esum = rel(sum(v["M"] for v in out["paths"].values()), out["grad"]["M"])
    measured("P4 mixed: pretrain unrolled, finetune CG/Neumann/FD vs naive autograd", err, 1e-12)
    measured("P4 per-path terms sum to the total", esum, 1e-12)


@pytest.mark.parametrize("pre", [("cg", {"max_iter": 2, "tol": 0.0}), ("neumann", {"iterations": 4, "alpha": 0.4})])
def test_p4_pretrain_implicit_finetune_unrolled(pre, measured):
    """finetune unrolled (K steps reading pretrain), pretrain implicit at its iterate.

    Pretrain is not windowed (it steps in place); the path-2 vector reaches it
    through finetune's window and is then mapped by pretrain's implicit VJP:
    ``s_pre Aᵀ (Gᵀr + Σ_k ∂C_K/∂E_kᵀ Qᵀr)``."""
    d = p4_data(seed=6)
    lp, lf, K = 0.25, 0.4, 5
    eng = p4_engine(d, pre=pre, fin=("unrolled", {}), E=d["E0"], C=d["C0"], lr_pre=lp, lr_fin=lf)
    eng.run(K)
    out = eng.gradient("mask", by_path=True)
    A, F, G, Q, t, a, c = (d[k] for k in "AFGQtac")
    h = 1 + a
    s = 1 / h if pre[0] == "cg" else neumann_scale(h, pre[1]["iterations"], pre[1]["alpha"])
    # naive: E trajectory without graph; each E_k read by finetune is a leaf
    E, C = d["E0"].clone(), d["C0"].clone()
    leaves = []
    M = d["M"]
    for _ in range(K):
        E = (E - lp * ((E - A @ M) + a * E)).detach().requires_grad_()
        leaves.append(E)
        C = C - lf * ((C - F @ E) + c * C)
    r = (G @ E + Q @ C - t).detach()
    gE = torch.autograd.grad((C * (Q.T @ r)).sum(), leaves)
    vE2 = sum(gE)                                  # every read of E maps to pretrain's state
    ref1, ref2 = s * A.T @ (G.T @ r), s * A.T @ vE2
    errs = (rel(out["grad"]["M"], ref1 + ref2), rel(out["paths"][P1_PATH]["M"], ref1),
            rel(out["paths"][P2_PATH]["M"], ref2))
    measured("P4 mixed: pretrain CG/Neumann, finetune unrolled vs naive autograd", max(errs), 1e-12)


# --- the real schedule: mask updates, windows close, iterates move ----------------
@pytest.mark.parametrize("pre,fin", [
    (("cg", {"max_iter": 5, "tol": 0.0}), ("neumann", {"iterations": 4, "alpha": 0.6})),
    (("neumann", {"iterations": 6, "alpha": 0.4}), ("finite_difference", {"scale_by_lr": True})),
    (("unrolled", {}), ("unrolled", {})),
    (("unrolled", {}), ("cg", {})),
    (("cg", {}), ("unrolled", {})),
])
def test_p4_scheduled_mask_updates(pre, fin, measured):
    """pretrain unroll 3, finetune unroll 1: per mask update pretrain takes 3 steps,
    finetune 1 (reading pretrain's 3rd iterate), then mask updates and every window
    closes. Each level's VJP is a scalar times ``Aᵀ`` / ``Fᵀ``: implicit and FD as
    above (at the current iterate), unrolled pretrain ``η_p Σ_{j<3} (1 − η_p(1+a))^j``
    (its window restarts at each mask update), unrolled finetune ``η_f`` (one step from
    a detached start). Every gradient mask applies equals
    ``s_pre Aᵀ (Gᵀr + s_fin FᵀQᵀr)`` at the iterates of that moment."""
    d = p4_data(seed=9)
    lp, lf, K = 0.3, 0.4, 3
    eng = p4_engine(d, pre=pre, fin=fin, E=d["E0"], C=d["C0"], lr_pre=lp, lr_fin=lf,
                    pre_unroll=K, fin_unroll=1)
    mask, P, Fn = (eng.problems[n] for n in ("mask", "pretrain", "finetune"))

    def scale(method, h, lr, steps):
        name, o = method
        if name == "cg":
            return 1 / h
        if name == "neumann":
            return neumann_scale(h, o["iterations"], o["alpha"])
        if name == "unrolled":
            return lr * sum((1 - lr * h) ** j for j in range(steps))
        return lr if o.get("scale_by_lr") else 1.0

    sp, sf = scale(pre, 1 + d["a"], lp, K), scale(fin, 1 + d["c"], lf, 1)
    errs = []
    for it in range(1, 4 * K + 1):
        eng.step()
        if it % K == 0:          # mask updated last: E, C are the iterates it read
            E, C = P.module.E.detach(), Fn.module.C.detach()
            r = d["G"] @ E + d["Q"] @ C - d["t"]
            expect = sp * d["A"].T @ (d["G"].T @ r + sf * d["F"].T @ (d["Q"].T @ r))
            errs.append(rel(mask.optimizer.record[-1], expect))
    assert eng.counts() == {"mask": 4, "pretrain": 4 * K, "finetune": 4}
    measured("P4 scheduled (4 mask updates), mixed/unrolled levels vs closed form", max(errs), 1e-12)
