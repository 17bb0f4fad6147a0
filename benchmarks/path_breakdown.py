#!/usr/bin/env python
"""Benchmark: how exactly the per-path breakdown sums to the total hypergradient.

A measurement, not a test. ``engine.gradient(upper, by_path=True)`` returns the total
hypergradient (``"grad"``: one push of the *summed* cotangent through each lower) and
each path's term (``"paths"``: every path pushed alone). The two agree exactly when every
best-response VJP on the paths is linear in its cotangent ``v``; this script prints the
relative gap ``‖Σ paths − (grad − own)‖ / ‖grad − own‖`` per method.

Graph ``p4_logcosh`` (float64): the two-path shape of P4 (``docs/design.md#p4``) with
non-quadratic levels, so that the lower gradients are not linear in the iterate::

    pretrain  E: f_pre = Σ logcosh(B_E E − A M) + a/2 ‖E‖²        (reads mask)
    finetune  C: f_ft  = Σ logcosh(B_C C − F E) + c/2 ‖C‖²        (reads pretrain)
    mask      M: L     = ½ ‖G E + Q C − t‖²                       (reads both)

    paths of mask: (mask, pretrain, mask) and (mask, pretrain, finetune, mask)

The lowers take ``--steps`` SGD steps from a random start (the mask never updates);
the hypergradient is then evaluated at that state. For ``unrolled`` the lowers step
through open windows of those steps. Graph ``mlo_mae`` is the tiny float64 MLO-MAE of
``python -m mlo.compare`` (``problems/compare_graphs.py``: real MAE blocks, a ReLU masking
network, damped lowers warmed up to a stationary point; 20 more lower steps).

    OMP_NUM_THREADS=1 python benchmarks/path_breakdown.py                 # both graphs, ~10 s
    OMP_NUM_THREADS=1 python benchmarks/path_breakdown.py --graphs p4_logcosh
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

import mlo

DT = torch.float64
HOLD = 10 ** 12                      # unroll_steps of finetune: mask never becomes ready

#: (label, method, options) measured on every graph.
SETTINGS: List[Tuple[str, str, dict]] = [
    ("unrolled", "unrolled", {}),
    ("neumann (K 10, α 0.5)", "neumann", {"iterations": 10, "alpha": 0.5}),
    ("cg converged (100 it., tol 1e-12)", "cg", {"max_iter": 100, "tol": 1e-12}),
    ("cg 3 iterations", "cg", {"max_iter": 3, "tol": 0.0}),
    ("finite_difference ε 0.01 (default)", "finite_difference", {"epsilon": 0.01}),
    ("finite_difference ε 0.1", "finite_difference", {"epsilon": 0.1}),
]


class Level(mlo.Problem):
    """A problem over explicit tensors whose loss is ``loss(self)``."""

    def __init__(self, name: str, params: Dict[str, torch.Tensor], loss: Callable, **kw):
        super().__init__(name, params=params, **kw)
        self._loss = loss

    def training_step(self, batch):
        return self._loss(self)


def p4_logcosh_data(seed: int = 0, m: int = 4, e: int = 8, c: int = 6, o: int = 7) -> dict:
    """Random matrices of ``p4_logcosh`` (``‖B_E‖, ‖B_C‖ ≈ 1`` so SGD at lr 0.5 is stable)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    BE, BC = r(e, e), r(c, c)
    BE, BC = BE / torch.linalg.matrix_norm(BE, 2), BC / torch.linalg.matrix_norm(BC, 2)
    return dict(A=r(e, m), F=r(c, e) / 2, G=r(o, e) / 2, Q=r(o, c) / 2, t=r(o), M=r(m),
                BE=BE, BC=BC, a=0.3, c=0.2, E0=r(e), C0=r(c))


def p4_logcosh_engine(d: dict, method: str, options: dict, lr: float = 0.5) -> Tuple[mlo.Engine, str]:
    """The ``p4_logcosh`` engine with ``method`` on both lowers; returns ``(engine, "mask")``."""
    def lc(x):
        return torch.log(torch.cosh(x)).sum()

    def cfg(unroll):
        return mlo.ProblemConfig(method=method, method_options=dict(options), unroll_steps=unroll)

    mask = Level("mask", {"M": d["M"]},
                 lambda s: 0.5 * ((d["G"] @ s.pre.params["E"] + d["Q"] @ s.fin.params["C"] - d["t"]) ** 2).sum(),
                 optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.05})
    pre = Level("pretrain", {"E": d["E0"]},
                lambda s: lc(d["BE"] @ s.params["E"] - d["A"] @ s.mask.params["M"])
                + 0.5 * d["a"] * (s.params["E"] ** 2).sum(),
                optimizer=torch.optim.SGD, optimizer_kwargs={"lr": lr}, config=cfg(1))
    fin = Level("finetune", {"C": d["C0"]},
                lambda s: lc(d["BC"] @ s.params["C"] - d["F"] @ s.pre.params["E"])
                + 0.5 * d["c"] * (s.params["C"] ** 2).sum(),
                optimizer=torch.optim.SGD, optimizer_kwargs={"lr": lr}, config=cfg(HOLD))
    mask.pre, mask.fin, pre.mask, fin.pre = pre, fin, mask, pre
    engine = mlo.Engine([mask, pre, fin], {"u2l": {mask: [pre]},
                                           "l2u": {pre: [fin, mask], fin: [mask]}})
    return engine, "mask"


def gap(out: dict) -> Tuple[float, float]:
    """``(‖Σ paths − (grad − own)‖ / ‖grad − own‖, ‖grad − own‖)`` over all variables."""
    keys = list(out["grad"])
    total = torch.cat([(out["grad"][k] - out["own"][k]).reshape(-1) for k in keys])
    summed = torch.cat([sum(p[k] for p in out["paths"].values()).reshape(-1) for k in keys])
    norm = float(torch.linalg.vector_norm(total))
    return float(torch.linalg.vector_norm(summed - total)) / norm, norm


def measure(factory: Callable[[str, dict], Tuple[mlo.Engine, str]], steps: int) -> List[dict]:
    """One row per setting: a fresh engine, ``steps`` lower steps, then the breakdown."""
    rows = []
    for label, method, options in SETTINGS:
        engine, upper = factory(method, options)
        engine.run(steps)
        t0 = time.perf_counter()
        out = engine.gradient(upper, by_path=True)
        seconds = time.perf_counter() - t0
        engine.close_windows()
        rel_gap, norm = gap(out)
        rows.append(dict(setting=label, paths=len(out["paths"]), gap=rel_gap, norm=norm, seconds=seconds))
    return rows


def graph_factory(name: str, seed: int):
    """``(factory, steps)`` of a graph name."""
    if name == "p4_logcosh":
        d = p4_logcosh_data(seed)
        return (lambda method, options: p4_logcosh_engine(d, method, options)), 5
    if name == "mlo_mae":
        from mlo.compare import get_graph
        spec = get_graph("mlo_mae")
        return spec.factory, spec.warmup
    raise SystemExit(f"error: unknown graph {name!r} (choose from p4_logcosh, mlo_mae)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", nargs="+", default=["p4_logcosh", "mlo_mae"],
                    help="p4_logcosh, mlo_mae (default: both)")
    ap.add_argument("--seed", type=int, default=0, help="data seed of p4_logcosh")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    for name in args.graphs:
        factory, steps = graph_factory(name, args.seed)
        rows = measure(factory, steps)
        print(f"\n{name} (float64, {steps} lower steps, {rows[0]['paths']} paths into the upper)\n")
        print("| method | ‖Σ paths − total‖ / ‖total‖ | ‖total‖ |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['setting']} | {r['gap']:.2e} | {r['norm']:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
