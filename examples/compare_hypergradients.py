"""Compare hypergradient approximations on built-in graphs (thin wrapper of ``mlo.compare``).

For each graph it computes the upper problem's hypergradient with every method ×
settings — unrolled K ∈ {1, 5, 20, 100}, Neumann K × α, CG iterations, finite
differences ε — and an exact reference at the same lower state, then prints a
table (cosine, relative error, median time, peak memory), a per-path breakdown
for multilevel graphs, and writes CSV + PNG (error vs cost, log-log)::

    python examples/compare_hypergradients.py                      # ridge, logreg, p4
    python examples/compare_hypergradients.py --graphs p4 --out out/ --repeats 3
    python -m mlo.compare --help                                   # the same tool

Your own graph, from Python::

    from mlo.compare import Setting, compare, format_report, save
    rep = compare(factory, methods=[Setting("cg", {"max_iter": 10}),
                                    Setting("unrolled", steps=20)],
                  reference=Setting("cg", {"tol": 1e-12, "max_iter": 1000}), warmup=100)
    print(format_report(rep)); save(rep, "out/")

where ``factory(method, options) -> (engine, upper_name)`` builds a fresh engine whose
lower problems use ``method`` and whose upper never becomes ready (see
``mlo/compare/runner.py`` for the protocol).
"""
from __future__ import annotations

import sys

from mlo.compare import available_graphs, main, register_graph


def register_mlo_mae() -> bool:
    """Hook for a tiny MLO-MAE graph (pretrain / finetune / mask on small images).

    ``mlo`` must not import ``problems`` (dependencies point examples → problems → mlo),
    so the graph is registered here. TODO: once ``problems`` provides a builder
    ``tiny_mlo_mae_compare(quick=False) -> mlo.compare.GraphSpec`` (a factory over the
    MLO-MAE graph with a frozen-size ViT, float64, and CG-to-1e-12 reference), it is
    picked up automatically and ``--graphs mlo_mae`` runs it.
    """
    try:
        from problems.graphs import tiny_mlo_mae_compare  # type: ignore[import-not-found]
    except ImportError:
        return False
    register_graph("mlo_mae", tiny_mlo_mae_compare)
    return True


if __name__ == "__main__":
    if not register_mlo_mae() and "mlo_mae" in sys.argv:
        sys.exit("the 'mlo_mae' graph is not available yet (problems.graphs.tiny_mlo_mae_compare "
                 f"missing); available: {', '.join(available_graphs())}")
    main()
