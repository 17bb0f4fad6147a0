"""The ``mlo_mae`` comparison graph (a plug-in of ``mlo.compare``, built in ``problems``).

A tiny float64 MLO-MAE from the real MAE blocks (:mod:`problems.compare_graphs`).
Checks: the graph is found through its ``mlo.compare_graphs`` entry point; at the
evaluated state the damped lowers are stationary and their Hessians positive
definite (so the IFT reference is the best-response derivative), the engine's CG
(100 iterations) and converged Neumann hypergradients of ``mask`` match the dense
reference per path, the engine's per-path terms sum to its total, and the command
line rejects unknown graph names in one line and writes the CSVs of ``mlo_mae``.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from mlo.compare import Setting, available_graphs, compare, get_graph, main
from mlo.compare.graphs import UnknownGraphError

torch.set_num_threads(1)

PATHS = [("mask", "pretrain", "mask"), ("mask", "pretrain", "finetune", "mask")]


def rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def spec():
    assert "mlo_mae" in available_graphs()       # listed from the entry point, not imported
    return get_graph("mlo_mae", quick=True)


def run(spec, methods):
    return compare(spec.factory, methods, spec.reference, warmup=spec.warmup, repeats=1,
                   memory=False, name=spec.name)


def test_evaluated_state_is_stationary_and_convex(spec):
    """Lowers at a stationary point of their damped losses, away from the ReLU kinks
    and the top-k switch, with positive-definite Hessians and α = 1 below 2/λ_max."""
    d = spec.data
    assert max(d["grad_norms"].values()) < 1e-10, d["grad_norms"]
    assert min(d["margins"].values()) > 1e-4, d["margins"]
    for k, (lo, hi) in d["spectra"].items():
        assert 0 < lo < hi < 2.0, (k, lo, hi)
    assert {tuple(p) for p in d["reference"]["paths"]} == set(PATHS)
    assert d["sizes"]["pretrain"] > 1000 and d["sizes"]["mask"] > 100


def test_cg_and_neumann_match_dense_reference_per_path(spec, measured):
    """CG with 100 iterations and Neumann with K = 300, α = 1 (contraction ≤ 0.93 per
    term at both levels: 0.93³⁰⁰ ≈ 4e-10) against the dense IFT reference, per path;
    CG with 1 iteration and Neumann with K = 5 are far off (the reference discriminates)."""
    methods = [Setting("cg", {"max_iter": 100, "tol": 0.0}),
               Setting("neumann", {"iterations": 300, "alpha": 1.0}),
               Setting("cg", {"max_iter": 1, "tol": 0.0}),
               Setting("neumann", {"iterations": 5, "alpha": 1.0})]
    rep = run(spec, methods)
    assert [tuple(p) for p in rep.paths] and set(map(tuple, rep.paths)) == set(PATHS)
    for row, name in zip(rep.rows[:2], ("CG 100 iterations", "Neumann K=300 α=1")):
        measured(f"mlo_mae {name} vs dense IFT reference, total", row.rel_error, 1e-6)
        for p in row.paths:
            measured(f"mlo_mae {name} vs dense IFT reference, per path", p.rel_error, 1e-6)
    for row in rep.rows[2:]:
        assert row.rel_error > 0.1 and all(p.rel_error > 0.1 for p in row.paths)


def test_engine_paths_sum_to_total(spec, measured):
    """``engine.gradient(mask, by_path=True)``: the two path terms add up to the
    hypergradient (``mask`` has no direct term), and so do the reference's."""
    eng, up = spec.factory("cg", {"max_iter": 100, "tol": 0.0})
    eng.run(spec.warmup)
    out = eng.gradient(up, by_path=True)
    assert set(out["paths"]) == set(PATHS)
    for k, g in out["grad"].items():
        total = sum(out["paths"][p][k] for p in PATHS)
        measured("mlo_mae engine: Σ path terms vs total hypergradient", rel(total, g), 1e-12)
        assert float(out["own"][k].abs().max()) == 0.0
    ref = spec.reference(eng, up)
    for k, g in ref["grad"].items():
        assert rel(ref["paths"][PATHS[0]][k] + ref["paths"][PATHS[1]][k], g) < 1e-14


def test_unknown_graph_is_a_one_line_error():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mlo.compare", "--graphs", "nosuch"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "nosuch" in lines[0] and "available" in lines[0]
    for name in ("mlo_mae", "three_level_quadratic", "ridge", "logreg"):
        assert name in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    with pytest.raises(UnknownGraphError, match="available: .*mlo_mae") as info:
        get_graph("nosuch")
    assert isinstance(info.value, KeyError) and "\n" not in str(info.value)


def test_cli_quick_writes_csv(tmp_path, capsys):
    (rep,) = main(["--graphs", "mlo_mae", "--quick", "--out", str(tmp_path), "--repeats", "1",
                   "--no-memory"])
    out = capsys.readouterr().out
    assert "per-path breakdown" in out and "mask → pretrain → finetune → mask" in out
    with open(tmp_path / "compare_mlo_mae.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == [r.setting.method for r in rep.rows]
    assert {"unrolled", "neumann", "cg", "finite_difference"} == {r["method"] for r in rows}
    with open(tmp_path / "compare_mlo_mae_paths.csv") as f:
        prow = list(csv.DictReader(f))
    assert len(prow) == 2 * len(rows)
    assert {r["path"] for r in prow} == {"->".join(p) for p in PATHS}
    assert (tmp_path / "compare_mlo_mae.png").exists()
