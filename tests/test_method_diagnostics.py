"""CG's bounded default and the diagnostics of CG and Neumann (issue 21), in float64.

* CG runs at most ``CG_MAX_ITER`` Hessian-vector products by default, records the
  iterations it took and its final relative residual ``‖r‖/‖v‖`` in
  ``Lower.diagnostics``, and warns once per problem when it stops above ``tol``.
* Neumann records ``‖(I − αH)^K α v‖ / ‖α v‖`` (its last term relative to the first)
  and warns once per problem when that exceeds 1 (the series grows).
* Through ``mlo.Engine`` the numbers land in ``engine.records[lower]``, and the
  hypergradients with the default options still match the closed forms.

Closed forms: P1 ridge (``tests/test_engines_closed_form.py``,
``tests/test_engine_methods_closed_form.py``) and an ill-conditioned quadratic
``f(w, x) = ½ wᵀAw − xᵀw``, whose best-response VJP is ``A⁻¹v`` (``∂²_{xw} f = −I``), so
the method's result *is* CG's iterate and its true residual ``‖A u − v‖/‖v‖`` is known.
"""
from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch

import engines.implicit as implicit
import mlo
from _helpers import RecSGD, Vars, rel
from engines.base import Lower, get
from engines.implicit import CG_MAX_ITER, CG_RESOLVED_LOW, CG_TOL
from mlo.update import Updater
from test_engine_methods_closed_form import D as D_ENGINE, data, engine, expected, g_of, hessian
from test_engines_closed_form import lower_at_optimum, ridge

DT = torch.float64


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test starts with no problem warned about or counted (the memory is per process)."""
    monkeypatch.setattr(implicit, "_WARNED", set())
    monkeypatch.setattr(implicit, "_SOLVES", {})


def ill_conditioned(n=120, cond=1e6, seed=0):
    """``A = Q diag(λ) Qᵀ`` with λ log-spaced over ``[1/cond, 1]`` and a random ``v``."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    lam = torch.logspace(-torch.log10(torch.tensor(cond)).item(), 0, n, dtype=DT)
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2, torch.randn(n, generator=gen, dtype=DT)


def quadratic_lower(A, label="", diagnostics=None) -> Lower:
    n = A.shape[0]
    w = torch.zeros(n, dtype=DT, requires_grad=True)
    x = torch.zeros(n, dtype=DT, requires_grad=True)
    return Lower(params=(w,), inputs=(x,), loss_fn=lambda ps, xs: 0.5 * ps[0] @ A @ ps[0] - xs[0] @ ps[0],
                 label=label, diagnostics=diagnostics)


def cg_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "cg " in str(w.message)]


# --- CG ---------------------------------------------------------------------------

def test_cg_default_is_bounded_and_converges_on_a_closed_form(measured):
    """Defaults: a bound of 20–50 iterations and tol 1e-10; on P1 (8 unknowns, non-default
    ‖XᵀX‖ and λ) CG converges within the number of unknowns, records it, and matches the
    closed form −w* ⊙ H⁻¹g without a warning."""
    sig = inspect.signature(get("cg")).parameters
    assert sig["max_iter"].default == CG_MAX_ITER and 20 <= CG_MAX_ITER <= 50
    assert sig["tol"].default == CG_TOL == 1e-10
    P = ridge(seed=4, x_norm=2.5, lam_range=(0.05, 0.4), n=20, d=8)
    lower = lower_at_optimum(P)
    lower.diagnostics, lower.label = {}, "problem 'ridge'"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = get("cg")(lower, (P["g"],))
    measured("CG defaults on P1 (d=8) vs closed form", rel(got, P["exact"]), 1e-10)
    d = lower.diagnostics
    assert set(d) == {"cg_iterations", "cg_residual"}
    assert isinstance(d["cg_iterations"], int) and 1 <= d["cg_iterations"] <= 8
    assert isinstance(d["cg_residual"], float) and d["cg_residual"] <= CG_TOL


def test_cg_below_float64_does_not_warn_about_what_float32_cannot_resolve():
    """Cond 30, 120 unknowns, defaults. float32: CG runs to the bound, its recurrence ends
    at ~3e-9 > tol while the true residual stalls at ~5e-7 — recorded, not warned about
    (≤ CG_RESOLVED_LOW); stopped at 30 iterations (~1e-5) it warns. float64 warns at ~2e-9."""
    A, v = ill_conditioned(n=120, cond=30)

    def solve(dtype, label, **opts):
        n = A.shape[0]
        Ad, vd = A.to(dtype), v.to(dtype)
        w, x = (torch.zeros(n, dtype=dtype, requires_grad=True) for _ in range(2))
        lower = Lower(params=(w,), inputs=(x,), diagnostics={}, label=label,
                      loss_fn=lambda ps, xs: 0.5 * ps[0] @ Ad @ ps[0] - xs[0] @ ps[0])
        (u,) = get("cg")(lower, (vd,), **opts)
        true = float(torch.linalg.vector_norm(A @ u.double() - v) / torch.linalg.vector_norm(v))
        return lower.diagnostics, true

    assert CG_RESOLVED_LOW == 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d, true = solve(torch.float32, "problem 'f32'")
    assert d["cg_iterations"] == CG_MAX_ITER and CG_TOL < d["cg_residual"] <= 1e-8
    assert 1e-7 < true < CG_RESOLVED_LOW            # the recurrence is past what float32 resolves
    with pytest.warns(RuntimeWarning, match=r"problem 'f32': cg stopped unconverged after 30 "):
        d30, _ = solve(torch.float32, "problem 'f32'", max_iter=30)
    assert d30["cg_residual"] > CG_RESOLVED_LOW
    unconverged = r"problem 'f64': cg stopped unconverged after 50 .* > tol = 1e-10 "
    with pytest.warns(RuntimeWarning, match=unconverged):
        d64, _ = solve(torch.float64, "problem 'f64'")
    assert CG_TOL < d64["cg_residual"] < CG_RESOLVED_LOW


def test_cg_residual_recorded_is_the_true_residual(measured):
    """On the ill-conditioned quadratic the result is CG's iterate u: the recorded residual
    is ‖A u − v‖/‖v‖ (the recurrence's, equal to the true one to rounding here)."""
    A, v = ill_conditioned()
    for max_iter in (7, 30):
        lower = quadratic_lower(A, diagnostics={})
        (u,) = get("cg")(lower, (v,), max_iter=max_iter, tol=0.0)
        true = float(torch.linalg.vector_norm(A @ u - v) / torch.linalg.vector_norm(v))
        assert lower.diagnostics["cg_iterations"] == max_iter
        measured("CG recorded residual vs ‖Au − v‖/‖v‖ (relative)",
                 abs(lower.diagnostics["cg_residual"] - true) / true, 1e-6)


def test_cg_ill_conditioned_stops_at_the_bound_and_warns_once_naming_the_problem():
    A, v = ill_conditioned()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        lowers = [quadratic_lower(A, "problem 'ill'", {}) for _ in range(3)]
        outs = [get("cg")(lo, (v,))[0] for lo in lowers]
    ws = cg_warnings(rec)
    assert len(ws) == 1, [str(w.message) for w in ws]
    d = lowers[0].diagnostics
    true = float(torch.linalg.vector_norm(A @ outs[0] - v) / torch.linalg.vector_norm(v))
    assert d["cg_iterations"] == CG_MAX_ITER and d["cg_residual"] > 1e3 * CG_TOL
    assert abs(d["cg_residual"] - true) <= 1e-6 * true
    msg = str(ws[0].message)
    assert msg.startswith("problem 'ill': cg stopped unconverged after 50 iterations (max_iter=50)")
    for part in (f"{d['cg_residual']:.3g} > tol = 1e-10", "Raise max_iter", "damping", "tol=0.0"):
        assert part in msg, (part, msg)
    # another problem, or other options, warn again; tol=0 (exactly max_iter) does not
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        get("cg")(quadratic_lower(A, "problem 'other'"), (v,))
        get("cg")(quadratic_lower(A, "problem 'ill'"), (v,), max_iter=40)
        lower = quadratic_lower(A, "problem 'exact'", {})
        get("cg")(lower, (v,), max_iter=12, tol=0.0)
    assert [str(w.message).split(": cg")[0] for w in cg_warnings(rec)] == ["problem 'other'", "problem 'ill'"]
    assert lower.diagnostics["cg_iterations"] == 12


def test_cg_breakdown_on_a_singular_hessian_is_named():
    """H = 0 on the direction of v: pᵀHp = 0, the residual is not finite — the warning
    says so and points to damping; with damping the same solve converges silently."""
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=DT))
    v = torch.tensor([1.0, 1.0], dtype=DT)
    lower = quadratic_lower(A, "problem 'flat'", {})
    with pytest.warns(RuntimeWarning, match=r"problem 'flat': cg broke down after \d+ iterations.*damping"):
        get("cg")(lower, (v,))
    assert lower.diagnostics["cg_residual"] != lower.diagnostics["cg_residual"]     # nan
    lower = quadratic_lower(A, "problem 'flat'", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (u,) = get("cg")(lower, (v,), damping=0.5)
    assert rel(u, torch.tensor([1 / 1.5, 1 / 0.5], dtype=DT)) < 1e-12


# --- Neumann ----------------------------------------------------------------------

def neumann_last_term(H, g, K, alpha):
    """``‖(I − αH)^K α g‖ / ‖α g‖``."""
    M = torch.linalg.matrix_power(torch.eye(H.shape[0], dtype=DT) - alpha * H, K)
    return float(torch.linalg.vector_norm(M @ g) / torch.linalg.vector_norm(g))


def test_neumann_records_its_last_term_and_stays_quiet_when_it_converges(measured):
    P = ridge(seed=5, x_norm=1.5, lam_range=(0.1, 0.5))
    lam_max = float(torch.linalg.eigvalsh(P["H"])[-1])
    alpha, K = 1.2 / lam_max, 6
    lower = lower_at_optimum(P)
    lower.diagnostics = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get("neumann")(lower, (P["g"],), iterations=K, alpha=alpha)
    got = lower.diagnostics["neumann_last_term"]
    assert set(lower.diagnostics) == {"neumann_last_term"} and got < 1
    want = neumann_last_term(P["H"], P["g"], K, alpha)
    measured("Neumann recorded last term vs ‖(I−αH)^K g‖/‖g‖", abs(got - want) / want, 1e-12)


def test_neumann_alpha_too_large_warns_once_that_the_series_grows(measured):
    """α = 2.4/λ_max: |1 − αλ_max| = 1.4, the series grows. One warning per problem,
    naming it, the numbers, the 2/λ_max rule, and an estimate of λ_max from the growth."""
    P = ridge(seed=6, x_norm=2.0, lam_range=(0.1, 0.6))
    lam_max = float(torch.linalg.eigvalsh(P["H"])[-1])
    alpha, K = 2.4 / lam_max, 30
    lowers = [lower_at_optimum(P) for _ in range(3)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for lo in lowers:
            lo.label, lo.diagnostics = "problem 'grows'", {}
            get("neumann")(lo, (P["g"],), iterations=K, alpha=alpha)
    ws = [w for w in rec if issubclass(w.category, RuntimeWarning) and "neumann" in str(w.message)]
    assert len(ws) == 1, [str(w.message) for w in ws]
    ratio = lowers[0].diagnostics["neumann_last_term"]
    measured("Neumann (growing) recorded last term vs closed form",
             abs(ratio - neumann_last_term(P["H"], P["g"], K, alpha)) / ratio, 1e-10)
    assert ratio > 1e3
    msg = str(ws[0].message)
    assert msg.startswith(f"problem 'grows': neumann: the series grows: its last term (k={K}) "
                          f"has {ratio:.3g} ×")
    assert f"alpha={alpha:g}" in msg and "0 < alpha < 2/λ_max(H)" in msg
    est = float(re.search(r"λ_max\(H\) ≈ ([0-9.e+-]+)", msg).group(1))
    assert abs(est - lam_max) < 0.1 * lam_max, (est, lam_max)
    suggested = float(re.search(r"use alpha below ([0-9.e+-]+)", msg).group(1))
    assert suggested < alpha and suggested < 2 / lam_max * 1.1


# --- through the engine -----------------------------------------------------------

@pytest.fixture
def note_method():
    """(``Updater.note_method`` stores the method's numbers in ``engine.records``.)"""
    assert callable(getattr(Updater, "note_method", None))


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_engine_defaults_match_closed_forms_and_reach_records(method, note_method, measured):
    """P1 through mlo.Engine with all-default options (CG: ≤ 50 iterations, tol 1e-10;
    Neumann: K 10, α 1 — H's eigenvalues lie in (0.2, 1.4)), a momentum lower and 3
    upper updates: the applied hypergradients match the closed forms and the last
    solve's numbers are in engine.records['lo']."""
    P = data(seed=7)
    eng, up, lo = engine(P, method, {}, lower_opt={"lr": 0.4, "momentum": 0.5})
    errs, last = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            lam = up.module.lam.detach().clone()
            eng.run(3)
            w = lo.module.w.detach().clone()
            opts = {"iterations": 10, "alpha": 1.0} if method == "neumann" else {}
            errs.append(rel(up.optimizer.record[-1], expected(P, method, opts, lam, w, None)))
            last = (lam, w)
    measured(f"P1 engine: {method} with default options vs closed form", max(errs), 1e-10)
    rec = eng.records["lo"]
    lam, w = last
    if method == "cg":
        assert 1 <= rec["cg_iterations"] <= D_ENGINE and rec["cg_residual"] <= CG_TOL
        assert "neumann_last_term" not in rec
    else:
        want = neumann_last_term(hessian(P, lam), g_of(P, w), 10, 1.0)
        measured("P1 engine: records['lo']['neumann_last_term'] vs closed form",
                 abs(rec["neumann_last_term"] - want) / want, 1e-10)
        assert "cg_iterations" not in rec
    assert "cg_iterations" not in eng.records["up"] and "neumann_last_term" not in eng.records["up"]


def test_engine_unconverged_cg_warns_once_and_records(note_method):
    """An ill-conditioned lower (120 unknowns, cond 1e6) with default CG: over 3 upper
    updates one warning naming the problem; the records hold 50 iterations and the
    residual of the last solve."""
    A, b = ill_conditioned()
    n = A.shape[0]
    up = Vars("up", {"x": b.clone()}, lambda s: 0.5 * (s.lo.params["w"] ** 2).sum() + 0 * s.params["x"].sum(),
              optimizer=RecSGD, optimizer_kwargs={"lr": 0.01})
    lo = Vars("lo", {"w": torch.zeros(n, dtype=DT)},
              lambda s: 0.5 * s.params["w"] @ A @ s.params["w"] - s.up.params["x"] @ s.params["w"],
              optimizer_kwargs={"lr": 0.5}, config=mlo.ProblemConfig(unroll_steps=2, method="cg"))
    up.lo, lo.up = lo, up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        eng.run(6)
    ws = cg_warnings(rec)
    assert eng.counts() == {"lo": 6, "up": 3}
    assert len(ws) == 1 and str(ws[0].message).startswith("problem 'lo': cg stopped unconverged after 50")
    r = eng.records["lo"]
    assert r["cg_iterations"] == CG_MAX_ITER and r["cg_residual"] > 1e3 * CG_TOL
    # the recorded residual is that of the last solve: v = w (upper's ∂F/∂w), u = applied gradient
    w_last = lo.module.w.detach()   # the lower did not step after the last upper update
    u = up.optimizer.record[-1]
    true = float(torch.linalg.vector_norm(A @ u - w_last) / torch.linalg.vector_norm(w_last))
    assert abs(r["cg_residual"] - true) <= 1e-6 * true


def test_engine_reference_method_leaves_records_alone(note_method):
    """``engine.gradient(..., method=(...))`` (a reference, e.g. the monitor's) does not
    write the lower's records; the problem's own method does."""
    P = data(seed=8)
    eng, up, lo = engine(P, "cg", {})
    eng.run(3)
    before = dict(eng.records["lo"])
    eng.gradient("up", method=("neumann", {"iterations": 4, "alpha": 0.5}))
    assert eng.records["lo"] == before and "cg_iterations" in before


def test_neumann_checks_its_growth_on_the_first_solves_and_then_every_hundredth():
    """The host read of the growth check is amortised: solves 1-10, then every 100th."""
    A = torch.diag(torch.tensor([0.5, 1.0], dtype=torch.float64))
    v = (torch.tensor([1.0, -2.0], dtype=torch.float64),)
    checked = []
    for i in range(1, 302):
        diag = {}
        lower = Lower(params=(torch.zeros(2, dtype=torch.float64, requires_grad=True),),
                      inputs=(torch.zeros(2, dtype=torch.float64, requires_grad=True),),
                      loss_fn=lambda ps, xs: 0.5 * ps[0] @ A @ ps[0] - ps[0] @ xs[0],
                      label="problem 'lo'", diagnostics=diag)
        implicit.neumann(lower, v, iterations=3, alpha=0.5)
        if "neumann_last_term" in diag:
            checked.append(i)
    assert checked == list(range(1, 11)) + [101, 201, 301]
