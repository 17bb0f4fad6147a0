"""A diamond with a back edge: six hypergradient paths, mixed methods (float64, closed forms).

    T  F(λ) = Σ log cosh(P_A α + P_B β + P_C γ − y) + ρ/2‖λ‖²     (reads A, B, C)
    A  α*(λ, γ) = argmin ½αᵀH_Aα − αᵀ(K_A λ + V_A γ)                (reads T and C)
    B  β*(λ)    = argmin ½βᵀH_Bβ − βᵀK_B λ                          (reads T)
    C  γ*(α, β) = argmin ½γᵀH_Cγ − γᵀ(W_A α + W_B β)                 (reads A and B)

    u2l = {T: [A, B], A: [C], B: [C]},  l2u = {A: [T], B: [T], C: [T, A]}

C is the bottom, T the top, A and B sit between them; C → A is a back edge (A also
reads the problem below it). T's paths and their terms (g_X = ∂F/∂X = P_Xᵀ tanh r)::

    (T, A, T)         J_ATᵀ g_A          (T, B, T)         J_BTᵀ g_B
    (T, A, C, T)      J_ATᵀ J_CAᵀ g_C    (T, B, C, T)      J_BTᵀ J_CBᵀ g_C
    (T, A, C, A, T)   J_ATᵀ J_CAᵀ J_ACᵀ g_A                (T, B, C, A, T)   J_BTᵀ J_CBᵀ J_ACᵀ g_A

with ``J_XY = M_X · (X's coupling matrix to Y)`` and ``M_X`` the inverse Hessian as
X's method sees it: CG ``H⁻¹``; Neumann(K, α) ``α Σ_{k≤K}(I − αH)^k``; finite
difference ``I`` (× lr); unrolled SGD(η) over a window of k steps
``Σ_{j<k}(I − ηH)^j η`` (all levels are quadratic, so every J is state-independent
and the window's Jacobian with respect to each read sums to this matrix even while
the read problem moves).
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import RecSGD, rel, Vars

DT = torch.float64
HUGE = 10 ** 9
LR = {"A": 0.2, "B": 0.25, "C": 0.15}
RHO = 0.3
PATHS = [("T", "A", "T"), ("T", "A", "C", "T"), ("T", "A", "C", "A", "T"),
         ("T", "B", "T"), ("T", "B", "C", "T"), ("T", "B", "C", "A", "T")]


def data(seed=21, nt=3, na=4, nb=3, nc=5, no=6):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731

    def spd(n, lo):
        X = r(n, n)
        return X @ X.T / n + lo * torch.eye(n, dtype=DT)

    return dict(HA=spd(na, 0.6), HB=spd(nb, 0.5), HC=spd(nc, 0.7), KA=r(na, nt), VA=r(na, nc) / 2,
                KB=r(nb, nt), WA=r(nc, na) / 2, WB=r(nc, nb) / 2, PA=r(no, na) / 2, PB=r(no, nb) / 2,
                PC=r(no, nc) / 2, y=r(no), lam=r(nt), a0=r(na), b0=r(nb), c0=r(nc))


def build(d, methods, unroll, lr_t=0.0):
    """``methods = {"A": (name, options), ...}``; ``unroll = {"A": k, ...}``."""
    q = lambda x, H: 0.5 * x @ H @ x  # noqa: E731
    cfg = {n: mlo.ProblemConfig(method=m[0], method_options=dict(m[1]), unroll_steps=unroll[n])
           for n, m in methods.items()}
    T = Vars("T", {"lam": d["lam"]},
             lambda s: torch.log(torch.cosh(d["PA"] @ s.A.params["a"] + d["PB"] @ s.B.params["b"]
                                            + d["PC"] @ s.C.params["c"] - d["y"])).sum()
             + 0.5 * RHO * (s.params["lam"] ** 2).sum(),
             optimizer=RecSGD, optimizer_kwargs={"lr": lr_t, "momentum": 0.3})
    A = Vars("A", {"a": d["a0"]}, lambda s: q(s.params["a"], d["HA"]) - s.params["a"] @ (
        d["KA"] @ s.T.params["lam"] + d["VA"] @ s.C.params["c"]), optimizer_kwargs={"lr": LR["A"]}, config=cfg["A"])
    B = Vars("B", {"b": d["b0"]}, lambda s: q(s.params["b"], d["HB"]) - s.params["b"] @ (d["KB"] @ s.T.params["lam"]),
             optimizer_kwargs={"lr": LR["B"]}, config=cfg["B"])
    C = Vars("C", {"c": d["c0"]}, lambda s: q(s.params["c"], d["HC"]) - s.params["c"] @ (
        d["WA"] @ s.A.params["a"] + d["WB"] @ s.B.params["b"]), optimizer_kwargs={"lr": LR["C"]}, config=cfg["C"])
    T.A, T.B, T.C, A.T, A.C, B.T, C.A, C.B = A, B, C, T, C, T, A, B
    return mlo.Engine([T, A, B, C], {"u2l": {T: [A, B], A: [C], B: [C]},
                                     "l2u": {A: [T], B: [T], C: [T, A]}})


def inverse(method, H, lr, window):
    """``M_X``: the inverse Hessian as ``method`` sees it (``window`` unrolled steps)."""
    name, o = method
    I = torch.eye(H.shape[0], dtype=DT)
    if name == "cg":
        return torch.linalg.inv(H)
    if name == "neumann":
        return o["alpha"] * sum(torch.linalg.matrix_power(I - o["alpha"] * H, k) for k in range(o["iterations"] + 1))
    if name == "finite_difference":
        return (lr if o.get("scale_by_lr") else 1.0) * I
    assert name == "unrolled"
    return sum(torch.linalg.matrix_power(I - lr * H, j) for j in range(window)) * lr


def expected(d, methods, windows, a, b, c, lam):
    """Closed-form own term and per-path terms at the iterates (a, b, c)."""
    M = {n: inverse(methods[n], d["H" + n], LR[n], windows.get(n, 0)) for n in "ABC"}
    JAT, JAC, JBT = M["A"] @ d["KA"], M["A"] @ d["VA"], M["B"] @ d["KB"]
    JCA, JCB = M["C"] @ d["WA"], M["C"] @ d["WB"]
    th = torch.tanh(d["PA"] @ a + d["PB"] @ b + d["PC"] @ c - d["y"])
    gA, gB, gC = d["PA"].T @ th, d["PB"].T @ th, d["PC"].T @ th
    paths = {PATHS[0]: JAT.T @ gA, PATHS[1]: JAT.T @ (JCA.T @ gC), PATHS[2]: JAT.T @ (JCA.T @ (JAC.T @ gA)),
             PATHS[3]: JBT.T @ gB, PATHS[4]: JBT.T @ (JCB.T @ gC), PATHS[5]: JBT.T @ (JCB.T @ (JAC.T @ gA))}
    return RHO * lam, paths


CG = ("cg", {"tol": 1e-14})
NEU = ("neumann", {"iterations": 4, "alpha": 0.4})
FD = ("finite_difference", {"epsilon": 0.02, "scale_by_lr": True})
UNR = ("unrolled", {})


def test_diamond_paths():
    d = data()
    eng = build(d, {n: CG for n in "ABC"}, {n: 1 for n in "ABC"})
    assert sorted(eng.graph.paths("T")) == sorted(PATHS)
    assert eng.graph.paths("A") == [("A", "C", "A")]
    assert eng.graph.paths("B") == [] and eng.graph.paths("C") == []
    assert eng.graph.order == ["C", "A", "B", "T"]


@pytest.mark.parametrize("mA,mB,mC", [
    (UNR, CG, NEU),          # unrolled middle (its window reads a moving C), implicit bottom
    (UNR, UNR, CG),          # both middles unrolled
    (CG, NEU, UNR),          # unrolled bottom, implicit middles (which never step)
    (NEU, UNR, FD),          # unrolled B, Neumann A, finite-difference bottom
    (FD, CG, NEU),           # no unrolled level
])
def test_diamond_per_path_and_total(mA, mB, mC, measured):
    """T frozen. An unrolled bottom keeps its window (C's upper never ready); an
    unrolled middle steps every iteration after C (C: unroll 1, A/B: never ready).
    ``gradient("T", by_path=True)`` after 4 iterations vs the closed form."""
    d = data()
    methods = {"A": mA, "B": mB, "C": mC}
    c_unrolled = mC[0] == "unrolled"
    unroll = {"A": HUGE, "B": HUGE, "C": HUGE if c_unrolled else 1}
    eng = build(d, methods, unroll)
    k = 4
    eng.run(k)
    assert eng.counts() == {"T": 0, "A": 0 if c_unrolled else k, "B": 0 if c_unrolled else k, "C": k}
    windows = {n: k for n in "ABC" if methods[n][0] == "unrolled"}
    assert sorted(eng.open_windows()) == sorted(windows)          # every unrolled level holds k steps
    out = eng.gradient("T", by_path=True)
    eng.close_windows()
    P = eng.problems
    own, paths = expected(d, methods, windows, P["A"].module.a.detach(), P["B"].module.b.detach(),
                          P["C"].module.c.detach(), d["lam"])
    assert sorted(out["paths"]) == sorted(PATHS)
    errs = [rel(out["paths"][p]["lam"], e) for p, e in paths.items()]
    errs += [rel(out["grad"]["lam"], own + sum(paths.values())), rel(out["own"]["lam"], own)]
    measured("diamond (6 paths), mixed unrolled/CG/Neumann/FD: per-path and total vs closed form",
             max(errs), 1e-11)
    # every path carries a non-negligible term, so a dropped or duplicated path would show
    total = torch.linalg.vector_norm(sum(paths.values()))
    assert min(float(torch.linalg.vector_norm(e)) for e in paths.values()) > 1e-3 * float(total)


@pytest.mark.parametrize("mA,mB,mC", [(UNR, CG, NEU), (NEU, UNR, CG), (CG, FD, NEU)])
def test_diamond_scheduled_updates(mA, mB, mC, measured):
    """T really updates: C steps every iteration, A and B after each C step, T after
    every 2nd step of A and B (unroll 2), which consumes their windows. An unrolled
    middle's window therefore always holds 2 steps. Every gradient T applies equals
    own + Σ paths at the iterates T read (closed form)."""
    d = data(seed=22)
    methods = {"A": mA, "B": mB, "C": mC}
    eng = build(d, methods, {"A": 2, "B": 2, "C": 1}, lr_t=0.1)
    P = eng.problems
    windows = {n: 2 for n in "AB" if methods[n][0] == "unrolled"}
    errs = []
    for it in range(1, 9):
        lam = P["T"].module.lam.detach().clone()
        eng.step()
        assert eng.counts() == {"T": it // 2, "A": it, "B": it, "C": it}
        if it % 2 == 0:           # T updated last; all windows closed: the modules hold what T read
            own, paths = expected(d, methods, windows, P["A"].module.a.detach(), P["B"].module.b.detach(),
                                  P["C"].module.c.detach(), lam)
            errs.append(rel(P["T"].optimizer.record[-1], own + sum(paths.values())))
    assert len(errs) == 4 and not eng.open_windows()
    measured("diamond scheduled (T updating 4 times), mixed methods vs closed form", max(errs), 1e-11)


def test_paths_through_a_closed_window_report_zeros(measured):
    """C unrolled with unroll 1: A (which has C on its own path (A, C, A)) becomes ready
    every iteration and ends C's window, so between iterations every path of T through
    C is truncated. ``by_path`` lists those paths with zeros for every variable (it used
    to give an empty dict: ``out["paths"][p]["lam"]`` raised KeyError); the two others
    are ``J_ATᵀ g_A`` and ``J_BTᵀ g_B``."""
    d = data(seed=23)
    methods = {"A": CG, "B": NEU, "C": UNR}
    eng = build(d, methods, {"A": HUGE, "B": HUGE, "C": 1})
    eng.run(3)
    assert "C" not in eng.open_windows()
    out = eng.gradient("T", by_path=True)
    P = eng.problems
    own, paths = expected(d, methods, {"C": 1}, P["A"].module.a.detach(), P["B"].module.b.detach(),
                          P["C"].module.c.detach(), d["lam"])
    through_c = [p for p in PATHS if "C" in p]
    assert all(torch.equal(out["paths"][p]["lam"], torch.zeros_like(d["lam"])) for p in through_c)
    kept = {p: paths[p] for p in PATHS if p not in through_c}
    errs = [rel(out["paths"][p]["lam"], e) for p, e in kept.items()]
    errs.append(rel(sum(v["lam"] for v in out["paths"].values()), out["grad"]["lam"] - out["own"]["lam"]))
    errs.append(rel(out["grad"]["lam"], own + sum(kept.values())))
    measured("diamond, C's window closed: surviving paths and total vs closed form", max(errs), 1e-12)
