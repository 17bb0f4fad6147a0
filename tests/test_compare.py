"""The hypergradient comparison tool (``mlo.compare``) on the built-in ridge and
three_level_quadratic graphs.

Tiny settings, one timing repeat. Checks: files are written; the exact references
agree with independent computations (autograd through the closed-form best
responses); CG with as many iterations as lower parameters has ~0 error, while on
three_level_quadratic (non-identity SPD level Hessians) CG with 1 iteration does not
and Neumann's error falls with K; the numbers in the table are the ones an engine
built from the same factory computes (including the unrolled protocol: ``warmup − K``
truncated steps, then a K-step window, against the P1 closed-form recursion); the old
graph name ``p4`` still works, with a ``DeprecationWarning``.
"""
from __future__ import annotations

import csv

import pytest
import torch

from mlo.compare import (Setting, available_graphs, compare, format_report, format_table, get_graph,
                         graphs, main, save)
from mlo.compare.graphs import HOLD

DT = torch.float64


def rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def run(spec, methods, memory=False):
    return compare(spec.factory, methods, spec.reference, warmup=spec.warmup, repeats=1,
                   memory=memory, name=spec.name, description=spec.description,
                   reference_name=spec.reference_name)


@pytest.fixture(scope="module")
def ridge():
    return get_graph("ridge", quick=True)


@pytest.fixture(scope="module")
def three_level():
    return get_graph("three_level_quadratic", quick=True)


def test_ridge_runs_and_writes_csv_png(ridge, tmp_path):
    d = ridge.data["X"].shape[1]
    methods = [Setting("unrolled", steps=5), Setting("neumann", {"iterations": 5, "alpha": 1.0}),
               Setting("cg", {"max_iter": d, "tol": 0.0}), Setting("finite_difference", {"epsilon": 0.01})]
    rep = run(ridge, methods, memory=True)
    text = format_report(rep)
    print(text)
    files = save(rep, str(tmp_path))
    assert [f.split("/")[-1] for f in files] == ["compare_ridge.csv", "compare_ridge.png"]
    with open(files[0]) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["unrolled", "neumann", "cg", "finite_difference"]
    assert (tmp_path / "compare_ridge.png").stat().st_size > 1000
    by = {r.setting.method: r for r in rep.rows}
    assert by["cg"].rel_error < 1e-10 and abs(by["cg"].cosine - 1) < 1e-12   # CG at d iterations
    assert by["finite_difference"].rel_error > 1e-2                          # H⁻¹ ≈ I is not exact
    for r in rep.rows:
        assert r.time_s > 0 and r.peak_bytes > 0
        assert f"{r.rel_error:.2e}" in text
        assert float(rows[rep.rows.index(r)]["rel_error"]) == r.rel_error   # CSV = table


def test_ridge_reference_is_exact(ridge):
    """The dense reference equals autograd through w*(λ) = (XᵀX + diag λ)⁻¹Xᵀy."""
    X, y, Xv, yv, lam = (ridge.data[k] for k in ("X", "y", "Xv", "yv", "lam"))
    lam_ = lam.clone().requires_grad_()
    w = torch.linalg.solve(X.T @ X + torch.diag(lam_), X.T @ y)
    (exact,) = torch.autograd.grad(0.5 * ((Xv @ w - yv) ** 2).sum(), lam_)
    rep = run(ridge, [Setting("cg", {"max_iter": 1000, "tol": 1e-14})])
    assert rel(rep.rows[0].ref, exact) < 1e-10      # the lower is at w* after warmup
    assert rep.rows[0].rel_error < 1e-10            # and an engine-computed CG agrees


def test_ridge_table_numbers_are_engine_numbers(ridge):
    """Rebuild the engines by hand from the factory and redo the protocol."""
    K, eta = 5, ridge.data["eta"]
    X, y, Xv, yv, lam = (ridge.data[k] for k in ("X", "y", "Xv", "yv", "lam"))
    opts = {"iterations": 7, "alpha": 0.5}
    rep = run(ridge, [Setting("neumann", opts), Setting("unrolled", steps=K)])
    # implicit: warmup steps, then engine.gradient
    eng, up = ridge.factory("neumann", opts)
    eng.run(ridge.warmup)
    g = eng.gradient(up)["grad"]["lam"]
    assert torch.equal(g, rep.rows[0].grad)
    # unrolled: warmup − K truncated steps, then one K-step window
    eng, up = ridge.factory("unrolled", {})
    for _ in range(ridge.warmup - K):
        eng.step()
        eng.close_windows()
    w = eng.problems["lower"].module.w.detach().clone()
    eng.run(K)
    g = eng.gradient(up)["grad"]["lam"]
    assert torch.equal(g, rep.rows[1].grad)
    # ... which is the P1 closed-form K-step recursion from that checkpoint
    d = lam.numel()
    H = X.T @ X + torch.diag(lam)
    Mt = torch.eye(d, dtype=DT) - eta * H
    s = torch.zeros(d, d, dtype=DT)
    for _ in range(K):
        s = Mt @ s - eta * torch.diag(w)
        w = Mt @ w + eta * X.T @ y
    expect = s.T @ (Xv.T @ (Xv @ w - yv))
    assert rel(rep.rows[1].grad, expect) < 1e-10
    # the reported metrics are computed from these vectors
    for r in rep.rows:
        assert r.rel_error == pytest.approx(rel(r.grad, r.ref), rel=1e-12)
        assert r.cosine == pytest.approx(float(r.grad @ r.ref / (r.grad.norm() * r.ref.norm())), rel=1e-12)
    assert rep.rows[1].rel_error > 1e-3          # K=5 is far from the implicit value


def three_level_closed_form(three_level):
    """Independent of the graph's reference: best responses by autograd through dense
    solves, ``E*(M) = (S_E + aI)⁻¹S_E A M``, ``C*(E) = (S_C + cI)⁻¹S_C F E``, the residual
    ``r*`` at the optimum, and each path's term as a vector-Jacobian product with ``r*``."""
    A, F, G, Q, t, M, a, c, SE, SC = (three_level.data[k] for k in
                                      ("A", "F", "G", "Q", "t", "M", "a", "c", "SE", "SC"))
    M_ = M.clone().requires_grad_()
    E = torch.linalg.solve(SE + a * torch.eye(A.shape[0], dtype=DT), SE @ A @ M_)
    C = torch.linalg.solve(SC + c * torch.eye(F.shape[0], dtype=DT), SC @ F @ E)
    r = (G @ E + Q @ C - t).detach()
    (direct,) = torch.autograd.grad(r @ (G @ E), M_, retain_graph=True)
    (through_c,) = torch.autograd.grad(r @ (Q @ C), M_, retain_graph=True)
    (total,) = torch.autograd.grad(0.5 * ((G @ E + Q @ C - t) ** 2).sum(), M_)
    return r, {("mask", "pretrain", "mask"): direct, ("mask", "pretrain", "finetune", "mask"): through_c}, total


def test_three_level_runs_per_path_breakdown_and_reference(three_level, tmp_path):
    e = three_level.data["A"].shape[0]
    methods = [Setting("cg", {"max_iter": e, "tol": 0.0}), Setting("unrolled", steps=3),
               Setting("finite_difference", {"epsilon": 0.01})]
    rep = run(three_level, methods)
    text = format_report(rep)
    print(text)
    files = save(rep, str(tmp_path))
    assert sorted(f.split("/")[-1] for f in files) == [
        "compare_three_level_quadratic.csv", "compare_three_level_quadratic.png",
        "compare_three_level_quadratic_paths.csv"]
    with open(tmp_path / "compare_three_level_quadratic_paths.csv") as f:
        prow = list(csv.DictReader(f))
    assert len(prow) == 2 * len(methods)
    assert len(rep.paths) == 2 and "per-path breakdown" in text
    cg = rep.rows[0]
    assert cg.rel_error < 1e-10
    for p in cg.paths:
        assert p.rel_error < 1e-10 and abs(p.cosine - 1) < 1e-12
    assert sum(p.share for p in cg.paths) >= 1 - 1e-12      # triangle inequality
    # FD: H⁻¹ ≈ I at both levels, i.e. J_E ≈ S_E A and J_C ≈ S_C F; a quadratic makes
    # the central difference exact, so each path's error is that of the closed form
    A, F, G, Q, SE, SC = (three_level.data[k] for k in ("A", "F", "G", "Q", "SE", "SC"))
    r, exact, _ = three_level_closed_form(three_level)
    fd_terms = {("mask", "pretrain", "mask"): (SE @ A).T @ (G.T @ r),
                ("mask", "pretrain", "finetune", "mask"): (SE @ A).T @ ((Q @ SC @ F).T @ r)}
    for p in rep.rows[2].paths:
        assert p.rel_error == pytest.approx(rel(fd_terms[tuple(p.path)], exact[tuple(p.path)]), rel=1e-6)
        assert p.rel_error > 0.1


def test_three_level_reference_is_exact(three_level, measured):
    """Closed-form per-path reference vs autograd through E*(M), C*(E*(M)) (the warmup
    reaches the best responses, so the reference is also the total derivative)."""
    _, exact_paths, exact = three_level_closed_form(three_level)
    opts = {"iterations": 400, "alpha": 1.0}   # ‖I − H_C‖ ≈ 0.91: 0.91⁴⁰⁰ ≈ 4e-17
    rep = run(three_level, [Setting("neumann", opts)])
    measured("three_level_quadratic closed-form reference (after warmup) vs autograd through E*, C*",
             rel(rep.rows[0].ref, exact), 1e-10)
    assert rep.rows[0].rel_error < 1e-10
    # the engine's own numbers for this setting, rebuilt by hand
    eng, up = three_level.factory("neumann", opts)
    eng.run(three_level.warmup)
    out = eng.gradient(up, by_path=True)
    assert torch.equal(out["grad"]["M"], rep.rows[0].grad)
    assert {tuple(p.path) for p in rep.rows[0].paths} == set(out["paths"])
    ref = three_level.reference(eng, up)
    for path, term in exact_paths.items():
        measured("three_level_quadratic closed-form reference per path vs autograd through E*, C*",
                 rel(ref["paths"][path]["M"], term), 1e-10)


def test_three_level_discriminates_methods(three_level, measured):
    """The lower Hessians are not multiples of I: CG with 1 iteration is far off on
    every path, CG with many iterations matches the closed form per path, Neumann's
    error falls with K for both α, finite differences are off."""
    a, c, SE, SC = (three_level.data[k] for k in ("a", "c", "SE", "SC"))
    for S, reg in ((SE, a), (SC, c)):
        ev = torch.linalg.eigvalsh(S + reg * torch.eye(S.shape[0], dtype=DT))
        assert ev[-1] / ev[0] > 10 and ev[-1] < 2            # ill-conditioned; α = 1 contracts
    e = three_level.data["A"].shape[0]
    Ks, alphas = (5, 20, 100), (0.3, 1.0)
    methods = ([Setting("cg", {"max_iter": 1, "tol": 0.0}), Setting("cg", {"max_iter": 3, "tol": 0.0})]
               + [Setting("cg", {"max_iter": k, "tol": 0.0}) for k in (e, 4 * e)]
               + [Setting("neumann", {"iterations": k, "alpha": al}) for al in alphas for k in Ks])
    rows = run(three_level, methods).rows
    cg1, cg3, *cg_many = rows[:4]
    assert cg1.rel_error > 0.5 and all(p.rel_error > 0.1 for p in cg1.paths)
    assert cg1.rel_error > cg3.rel_error > 1e-3
    for row in cg_many:
        measured("three_level_quadratic CG (≥ dim iterations) vs closed form, total", row.rel_error, 1e-8)
        for p in row.paths:
            measured("three_level_quadratic CG (≥ dim iterations) vs closed form, per path",
                     p.rel_error, 1e-8)
    neu = rows[4:]
    for i in range(len(alphas)):
        errs = [r.rel_error for r in neu[i * len(Ks):(i + 1) * len(Ks)]]
        print(f"three_level_quadratic Neumann α={alphas[i]}: K={Ks} → {errs}")
        assert errs[0] > 1e-2 and errs[0] > errs[1] > errs[2]


def test_p4_is_a_deprecated_alias(three_level):
    """``p4`` (name and builder function) builds three_level_quadratic, warning at the
    caller's line with the new name; it is not listed among the available graphs."""
    with pytest.warns(DeprecationWarning, match="'p4' is deprecated; use 'three_level_quadratic'") as w:
        spec = get_graph("p4", quick=True)
    assert w[0].filename == __file__
    assert spec.name == "three_level_quadratic"
    assert [s.label for s in spec.settings] == [s.label for s in three_level.settings]
    assert all(torch.equal(spec.data[k], three_level.data[k]) for k in ("A", "F", "G", "SE", "SC"))
    with pytest.warns(DeprecationWarning, match="use 'three_level_quadratic'") as w:
        assert graphs.p4(quick=True).name == "three_level_quadratic"
    assert w[0].filename == __file__
    assert "p4" not in available_graphs() and "three_level_quadratic" in available_graphs()


def test_cli_runs_the_deprecated_name_with_a_note(tmp_path, capsys):
    with pytest.warns(DeprecationWarning, match="'p4' is deprecated"):
        (rep,) = main(["--graphs", "p4", "--quick", "--repeats", "1", "--no-memory",
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "'p4' is deprecated; use 'three_level_quadratic'" in err
    assert rep.name == "three_level_quadratic"
    assert (tmp_path / "compare_three_level_quadratic.csv").is_file()


def test_reference_setting_and_errors(ridge):
    # a Setting reference runs in its own engine at the copied state
    d = ridge.data["X"].shape[1]
    rep = compare(ridge.factory, [Setting("cg", {"max_iter": 2, "tol": 0.0})],
                  Setting("cg", {"max_iter": d, "tol": 0.0}), warmup=20, repeats=1, memory=False)
    exact = ridge.reference
    eng, up = ridge.factory("cg", {})
    eng.run(20)
    assert rel(rep.rows[0].ref, exact(eng, up)["grad"]["lam"]) < 1e-10
    assert "cg" in format_table(rep)
    with pytest.raises(ValueError, match="warmup"):
        compare(ridge.factory, [Setting("unrolled", steps=30)], ridge.reference, warmup=10)
    with pytest.raises(ValueError, match="steps"):
        compare(ridge.factory, [Setting("unrolled")], ridge.reference, warmup=10)

    def bad_factory(method, options):     # the upper becomes ready: contract violated
        eng, up = ridge.factory(method, options)
        eng.problems["lower"].config.unroll_steps = 1
        eng.problems["lower"].config.__post_init__()
        return eng, up

    assert HOLD > 10 ** 6
    with pytest.raises(RuntimeError, match="became ready"):
        compare(bad_factory, [Setting("cg")], ridge.reference, warmup=3, repeats=1, memory=False)
