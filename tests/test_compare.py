"""The hypergradient comparison tool (``mlo.compare``) on the built-in ridge and p4 graphs.

Tiny settings, one timing repeat. Checks: files are written; the exact references
agree with independent computations (autograd through the closed-form best
responses); CG with as many iterations as lower parameters has ~0 error; the
numbers in the table are the ones an engine built from the same factory computes
(including the unrolled protocol: ``warmup − K`` truncated steps, then a K-step
window, against the P1 closed-form recursion).
"""
from __future__ import annotations

import csv

import pytest
import torch

from mlo.compare import (Setting, compare, format_report, format_table, get_graph, save)
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
def p4():
    return get_graph("p4", quick=True)


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


def test_p4_runs_per_path_breakdown_and_reference(p4, tmp_path):
    e = p4.data["A"].shape[0]
    methods = [Setting("cg", {"max_iter": e, "tol": 0.0}), Setting("unrolled", steps=3),
               Setting("finite_difference", {"epsilon": 0.01})]
    rep = run(p4, methods)
    text = format_report(rep)
    print(text)
    files = save(rep, str(tmp_path))
    assert sorted(f.split("/")[-1] for f in files) == ["compare_p4.csv", "compare_p4.png",
                                                        "compare_p4_paths.csv"]
    with open(tmp_path / "compare_p4_paths.csv") as f:
        prow = list(csv.DictReader(f))
    assert len(prow) == 2 * len(methods)
    assert len(rep.paths) == 2 and "per-path breakdown" in text
    cg = rep.rows[0]
    assert cg.rel_error < 1e-12
    for p in cg.paths:
        assert p.rel_error < 1e-12 and abs(p.cosine - 1) < 1e-12
    assert sum(p.share for p in cg.paths) >= 1 - 1e-12      # triangle inequality
    # FD: H⁻¹ ≈ I at both levels — exactly (1+a)(1+c) / (1+a) too large per path
    fd = rep.rows[2]
    a, c = p4.data["a"], p4.data["c"]
    errs = sorted(p.rel_error for p in fd.paths)
    assert errs[0] == pytest.approx(a, rel=1e-6)                    # path 1: factor (1+a)
    assert errs[1] == pytest.approx((1 + a) * (1 + c) - 1, rel=1e-6)  # path 2: (1+a)(1+c)


def test_p4_reference_is_exact(p4):
    """Closed-form per-path reference vs autograd through E*(M), C*(E*(M))."""
    A, F, G, Q, t, M, a, c = (p4.data[k] for k in ("A", "F", "G", "Q", "t", "M", "a", "c"))
    M_ = M.clone().requires_grad_()
    E = torch.linalg.solve((1 + a) * torch.eye(A.shape[0], dtype=DT), A @ M_)
    C = torch.linalg.solve((1 + c) * torch.eye(F.shape[0], dtype=DT), F @ E)
    (exact,) = torch.autograd.grad(0.5 * ((G @ E + Q @ C - t) ** 2).sum(), M_)
    rep = run(p4, [Setting("neumann", {"iterations": 100, "alpha": 1.0})])
    assert rel(rep.rows[0].ref, exact) < 1e-10
    assert rep.rows[0].rel_error < 1e-12
    # the engine's own numbers for this setting, rebuilt by hand
    eng, up = p4.factory("neumann", {"iterations": 100, "alpha": 1.0})
    eng.run(p4.warmup)
    out = eng.gradient(up, by_path=True)
    assert torch.equal(out["grad"]["M"], rep.rows[0].grad)
    assert {tuple(p.path) for p in rep.rows[0].paths} == set(out["paths"])


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
